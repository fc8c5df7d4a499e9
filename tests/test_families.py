"""Every supported model family: placement, identity at init, odd shapes, prefix tokens, parameter counts."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from mona_peft import MonaConfig, MonaLayer
from tiny_models import FAMILIES, logits, pixels, randomize_adapter

ALL = sorted(FAMILIES)


def per_mona_params(channels: int, m: int, kernels=(3, 5, 7)) -> int:
    """LN (2C) + s1, s2 (2C) + down (Cm + m) + depthwise convs + 1x1 (m^2 + m) + up (mC + C)."""
    return 2 * channels * m + 5 * channels + m * m + 2 * m + sum(m * k * k + m for k in kernels)


@pytest.mark.parametrize("family", ALL)
def test_default_init_is_exact_identity(family: str) -> None:
    spec = FAMILIES[family]
    base = spec.build()
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = logits(base, x, **spec.forward_kwargs)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    n_layers = sum(isinstance(m, MonaLayer) for m in model.modules())
    assert n_layers == (2 if "swin" not in family else 4)
    with torch.no_grad():
        assert torch.equal(logits(model, x, **spec.forward_kwargs), expected)


@pytest.mark.parametrize("family", ALL)
def test_odd_sizes_forward_backward(family: str) -> None:
    spec = FAMILIES[family]
    model = get_peft_model(
        spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False, modules_to_save=["classifier"])
    )
    randomize_adapter(model)
    model.train()
    for size in (spec.image_size, spec.odd_size):
        out = logits(model, pixels(size, batch=3), **spec.forward_kwargs)
        assert out.shape == (3, 3)
        out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(".mona_attn.default.conv5." in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("family", ALL)
def test_trainable_parameters_are_mona_and_head_only(family: str) -> None:
    spec = FAMILIES[family]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, modules_to_save=["classifier"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mona_" in n or ".modules_to_save." in n for n in trainable)
    blocks = [m for m in model.modules() if isinstance(m, MonaLayer)]
    expected = sum(2 * per_mona_params(b.hidden_size, 8) for b in blocks)
    n_mona = sum(p.numel() for n, p in model.named_parameters() if ".mona_" in n)
    assert n_mona == expected


def test_formula_matches_the_paper_note() -> None:
    # 133 * C + 9,728 per Mona at m = 64
    for channels in (96, 192, 384, 768, 1536):
        assert per_mona_params(channels, 64) == 133 * channels + 9728


def test_swin_large_official_count() -> None:
    config = transformers.SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=7)
    with torch.device("meta"):
        base = transformers.SwinModel(config)
    model = get_peft_model(base, MonaConfig())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 5_267_712


@pytest.mark.parametrize("family", ["vit", "dinov2_registers", "deit"])
def test_prefix_tokens_unchanged_mode(family: str) -> None:
    spec = FAMILIES[family]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False, prefix_tokens="unchanged"))
    randomize_adapter(model)
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        model(pixel_values=pixels(spec.odd_size), **spec.forward_kwargs)
    handle.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    # prefix tokens of the wrapped block's output equal the bare block's on the same input; patch tokens differ
    block = layer.base_layer
    bare = block(seen["inp"])
    bare = bare[0] if isinstance(bare, tuple) else bare
    p = spec.num_prefix
    torch.testing.assert_close(out[:, :p], bare[:, :p], atol=1e-6, rtol=1e-6)
    assert (out[:, p:] - bare[:, p:]).abs().max() > 1e-3


def test_prefix_tokens_tokenwise_mode_changes_prefix() -> None:
    spec = FAMILIES["vit"]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        model(pixel_values=pixels(spec.image_size))
        bare = layer.base_layer(seen["inp"])
    handle.remove()
    assert (seen["out"][:, :1] - bare[:, :1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_hidden_states_are_post_mona(family: str) -> None:
    spec = FAMILIES[family]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    with torch.no_grad():
        out = model(pixel_values=pixels(spec.image_size), output_hidden_states=True)
    handle.remove()
    block_out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert torch.equal(out.hidden_states[1], block_out)


@pytest.mark.parametrize("positions", [("attention",), ("mlp",)])
def test_single_position(positions: tuple[str, ...]) -> None:
    spec = FAMILIES["swin"]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, positions=positions, init_weights=False))
    names = {n for n, _ in model.named_parameters() if ".mona_" in n}
    assert names and all(f".mona_{'attn' if positions == ('attention',) else 'mlp'}." in n for n in names)
    randomize_adapter(model)
    out = logits(model, pixels(spec.odd_size))
    out.sum().backward()


def test_swin_backbone_inside_upernet() -> None:
    backbone = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        out_features=["stage1", "stage2"],
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=16, auxiliary_in_channels=16, num_labels=4, use_auxiliary_head=False
    )
    base = transformers.UperNetForSemanticSegmentation(config).eval()
    x = pixels((64, 48))
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8, modules_to_save=["decode_head"]))
    assert sum(isinstance(m, MonaLayer) for m in model.modules()) == 4
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, expected)
    randomize_adapter(model)
    model.train()
    out = model(pixel_values=x).logits
    assert out.shape[:2] == (2, 4)
    out.mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mona_" in n)
