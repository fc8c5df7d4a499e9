"""Hardening: property tests over shapes, dtypes, torch.compile, determinism, config files, concurrent models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

from mona_peft import MonaConfig, MonaLayer
from mona_peft.filters import merged_filter, reference_filter
from tiny_models import FAMILIES, pixels, randomize_adapter

PROPERTY_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _vit_like(family: str, registers: int) -> torch.nn.Module:
    common = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=16,
        patch_size=4,
        num_labels=2,
    )
    if family == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**common)).eval()
    if family == "deit":
        return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**common)).eval()
    return transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=registers)
    ).eval()


def _swin_like(family: str) -> torch.nn.Module:
    common = dict(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=3, num_labels=2
    )
    if family == "swin":
        return transformers.SwinForImageClassification(transformers.SwinConfig(**common)).eval()
    return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**common)).eval()


kernel_sets = st.lists(st.sampled_from([1, 3, 5, 7, 9]), min_size=1, max_size=3, unique=True).map(tuple)


@PROPERTY_SETTINGS
@given(
    family=st.sampled_from(["vit", "deit", "dinov2_registers", "swin", "swinv2"]),
    height=st.integers(6, 23),
    width=st.integers(6, 23),
    batch=st.integers(1, 3),
    bottleneck=st.integers(1, 256),
    kernels=kernel_sets,
    registers=st.integers(0, 4),
)
def test_shapes_and_identity_at_init(family, height, width, batch, bottleneck, kernels, registers) -> None:
    if family in ("swin", "swinv2"):
        base, kwargs = _swin_like(family), {}
    else:
        base, kwargs = _vit_like(family, registers), {"interpolate_pos_encoding": True}
        height, width = max(height, 4), max(width, 4)
    x = torch.randn(batch, 3, height, width)
    try:
        with torch.no_grad():
            expected = base(pixel_values=x, **kwargs).logits
    except RuntimeError:  # sizes the bare model itself rejects (e.g. transformers 4.57 Swin at tiny grids)
        reject()
    model = get_peft_model(base, MonaConfig(bottleneck_dim=bottleneck, kernel_sizes=kernels))
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs).logits
    assert out.shape == (batch, 2)
    assert torch.equal(out, expected)  # the default init is exactly the identity
    randomize_adapter(model)
    with torch.no_grad():
        changed = model(pixel_values=x, **kwargs).logits
    assert changed.shape == (batch, 2) and torch.isfinite(changed).all()


@PROPERTY_SETTINGS
@given(
    kernels=kernel_sets,
    channels=st.integers(1, 24),
    height=st.integers(1, 15),
    width=st.integers(1, 15),
    batch=st.integers(1, 3),
)
def test_merged_filter_property(kernels, channels, height, width, batch) -> None:
    generator = torch.Generator().manual_seed(channels * 1000 + height * 31 + width)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weights = [torch.randn(channels, 1, k, k, generator=generator) * 0.3 for k in kernels]
    biases = [torch.randn(channels, generator=generator) for _ in kernels]
    torch.testing.assert_close(
        merged_filter(x, weights, biases), reference_filter(x, weights, biases), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_computes_in_the_activation_dtype(dtype: torch.dtype) -> None:
    spec = FAMILIES["vit"]
    model = get_peft_model(spec.build().to(dtype), MonaConfig(bottleneck_dim=8, init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    x = torch.randn(2, 17, layer.hidden_size, dtype=dtype)
    delta = layer.mona_attn["default"](x, (4, 4), 1)
    assert delta.dtype == dtype  # no silent upcast of activations
    # PEFT keeps trainable adapter weights in float32 (autocast_adapter_dtype=True); compute is still in `dtype`
    assert layer.mona_attn["default"].down.weight.dtype == torch.float32
    out = model(pixel_values=pixels(spec.image_size).to(dtype)).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_torch_compile_without_graph_breaks() -> None:
    spec = FAMILIES["vit"]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False)).eval()
    randomize_adapter(model)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = model(pixel_values=x, interpolate_pos_encoding=True).logits
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(pixel_values=x, interpolate_pos_encoding=True)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(pixel_values=x, interpolate_pos_encoding=True).logits, expected)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["swin", "dinov2_registers"])
def test_torch_compile_inductor(family: str) -> None:
    spec = FAMILIES[family]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False)).eval()
    randomize_adapter(model)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model)(pixel_values=x).logits, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def _train(seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    spec = FAMILIES["swin"]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights="official"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = pixels(spec.image_size, batch=4, seed=step)
        loss = model(pixel_values=x, labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mona_" in n}


def test_same_seed_same_adapter() -> None:
    first, second, other = _train(0), _train(0), _train(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def _saved(tmp_path):
    spec = FAMILIES["vit"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixels(spec.image_size)).logits
    return base, expected


def test_unknown_config_fields_from_a_newer_version_are_ignored(tmp_path) -> None:
    base, expected = _saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels((32, 32))).logits, expected)


def test_missing_config_fields_take_their_defaults(tmp_path) -> None:
    base, expected = _saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("prefix_tokens", "dropout"):
        config.pop(key)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert loaded.peft_config["default"].prefix_tokens == "tokenwise"
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels((32, 32))).logits, expected)


def test_two_models_interleaved_keep_their_own_grids() -> None:
    vit_spec, dino_spec = FAMILIES["vit"], FAMILIES["dinov2"]
    vit = get_peft_model(vit_spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False)).eval()
    dino = get_peft_model(dino_spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False)).eval()
    randomize_adapter(vit, seed=1)
    randomize_adapter(dino, seed=2)
    a, b = pixels((40, 24)), pixels((24, 48))
    with torch.no_grad():
        ref_vit = vit(pixel_values=a, interpolate_pos_encoding=True).logits
        ref_dino = dino(pixel_values=b).logits
        for _ in range(2):
            torch.testing.assert_close(dino(pixel_values=b).logits, ref_dino, atol=0, rtol=0)
            torch.testing.assert_close(
                vit(pixel_values=a, interpolate_pos_encoding=True).logits, ref_vit, atol=0, rtol=0
            )


def test_gradient_checkpointing_with_changing_image_sizes() -> None:
    """Non-reentrant recomputation happens in backward; the grid must be the one of its own forward."""
    spec = FAMILIES["dinov2"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False, dropout=0.0))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        first = model(pixel_values=pixels((40, 24))).logits
        second = model(pixel_values=pixels((24, 48))).logits  # a forward with another grid before backward
        (first.square().sum() + second.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_pickled_model_round_trip(tmp_path) -> None:
    """A whole wrapped model survives torch.save / torch.load and copy.deepcopy, and keeps working."""
    spec = FAMILIES["vit"]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False)).eval()
    randomize_adapter(model)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = model(pixel_values=x, interpolate_pos_encoding=True).logits
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (restored, copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(other(pixel_values=x, interpolate_pos_encoding=True).logits, expected)
        layer = next(m for m in other.modules() if isinstance(m, MonaLayer))
        # the copy's block runs its own Mona (hooks bound to the copy's layer), not the original's
        hooks = [
            hook
            for module in layer.base_layer.modules()
            for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
            if isinstance(getattr(hook, "__self__", None), MonaLayer)
        ]
        assert len(hooks) == 3 and all(hook.__self__ is layer for hook in hooks)
        assert "forward" not in layer.base_layer.__dict__  # the block's forward is its class's, untouched
