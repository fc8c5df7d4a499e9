"""Mona on Swin backbones inside dense-prediction models: UperNet (semantic segmentation) and Mask2Former.

Mona goes into every block of the Swin backbone and nowhere else; the task head is trained in full through
``modules_to_save``, chosen by default per model (see ``mona_peft.heads``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

from mona_peft import MonaConfig, MonaLayer
from mona_peft.heads import task_head_modules
from tiny_models import FAMILIES, mask2former_swin, randomize_adapter, upernet_swin

UPERNET_HEADS = ["decode_head", "auxiliary_head"]
MASK2FORMER_HEADS = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy machine more threads only contend (10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "SwinLayer"}


def _trainable_owners(model: torch.nn.Module) -> set[str]:
    """What each trainable parameter belongs to: 'mona' or the head module wrapped by modules_to_save."""
    owners = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".mona_" in name:
            owners.add("mona")
        elif ".modules_to_save.default." in name:
            owners.add(name.removeprefix("base_model.model.").split(".modules_to_save.")[0])
        else:
            owners.add(name)
    return owners


@torch.no_grad()
def _perturb_heads(model: torch.nn.Module, seed: int = 1) -> None:
    """Change the trained copies of the head, so that a round trip that lost them would show."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".modules_to_save.default." in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


# -------------------------------------------------------------------------------------------------- UperNet + Swin
def test_upernet_mona_in_every_backbone_block_and_nowhere_else() -> None:
    base = upernet_swin()
    block_names = sorted(_blocks(base))
    assert len(block_names) == 4  # depths 1 + 2 + 1
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))

    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MonaLayer)}
    assert sorted(wrapped) == block_names
    assert all(name.startswith("backbone.") for name in wrapped)
    mona_params = [n for n, _ in model.named_parameters() if ".mona_" in n]
    assert mona_params and all(".backbone." in n for n in mona_params)
    assert not any(".mona_" in n for n, _ in model.base_model.model.decode_head.named_parameters())


def test_upernet_feature_pyramid_keeps_the_bottleneck_at_every_stage() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    shapes = {
        tuple(layer.mona_attn_down["default"].weight.shape)
        for layer in model.modules()
        if isinstance(layer, MonaLayer)
    }
    # Swin stage widths 16, 32, 64 (embed_dim doubles at each patch merging); the bottleneck stays 8.
    assert shapes == {(8, 16), (8, 32), (8, 64)}


def test_upernet_default_head_is_trainable_and_the_rest_frozen() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == UPERNET_HEADS
    assert _trainable_owners(model) == {"mona", *UPERNET_HEADS}
    inner = model.base_model.model
    for head in UPERNET_HEADS:
        wrapper = getattr(inner, head)
        assert isinstance(wrapper, ModulesToSaveWrapper)
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    # The backbone's own parameters (embeddings, norms, relative-position tables, output norms) stay frozen.
    frozen = [n for n, p in inner.backbone.named_parameters() if ".mona_" not in n]
    assert frozen and not any(p.requires_grad for n, p in inner.backbone.named_parameters() if ".mona_" not in n)


def test_upernet_without_auxiliary_head() -> None:
    model = get_peft_model(upernet_swin(auxiliary_head=False), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == ["decode_head"]


@pytest.mark.parametrize(
    ("given", "expected"), [(["decode_head"], {"mona", "decode_head"}), ([], {"mona"})], ids=["decode-only", "none"]
)
def test_explicit_modules_to_save_wins(given: list[str], expected: set[str]) -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8, modules_to_save=given))
    assert model.peft_config["default"].modules_to_save == given
    assert _trainable_owners(model) == expected


def test_upernet_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8)).eval()
    randomize_adapter(model)
    _perturb_heads(model)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # non-square: grids per stage
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        with model.disable_adapter():
            assert not torch.allclose(model(pixel_values=pixels).logits, expected)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == UPERNET_HEADS
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    owners = {"mona" if ".mona_" in k else k.removeprefix("base_model.model.").split(".")[0] for k in keys}
    assert owners == {"mona", *UPERNET_HEADS}
    assert all(".backbone." in k for k in keys if ".mona_" in k)

    loaded = PeftModel.from_pretrained(upernet_swin(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)


def test_upernet_training_steps_reduce_the_loss() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    model.train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    labels[:, 20:, :] = 2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # Gradients reached the Mona modules of every stage, not only the head.
    for layer in model.modules():
        if isinstance(layer, MonaLayer):
            assert layer.mona_mlp_up["default"].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- Mask2Former + Swin
def _mask2former_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.class_queries_logits, out.masks_queries_logits


@pytest.fixture
def scipy_available() -> None:
    pytest.importorskip("scipy", reason="transformers' Mask2Former needs scipy (pip install scipy)")


@pytest.mark.usefixtures("scipy_available")
def test_mask2former_wraps_the_backbone_and_trains_the_rest(tmp_path: Path) -> None:
    base = mask2former_swin()
    block_names = sorted(_blocks(base))
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8)).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MonaLayer))
    assert wrapped == block_names and len(wrapped) == 4
    assert all(n.startswith("model.pixel_level_module.encoder.") for n in wrapped)
    assert model.peft_config["default"].modules_to_save == MASK2FORMER_HEADS
    assert _trainable_owners(model) == {"mona", *MASK2FORMER_HEADS}

    randomize_adapter(model)
    _perturb_heads(model)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _mask2former_outputs(model, pixels)
    model.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in keys if ".mona_" not in k and not any(f".{h}." in k for h in MASK2FORMER_HEADS)]

    loaded = PeftModel.from_pretrained(mask2former_swin(), tmp_path).eval()
    for got, want in zip(_mask2former_outputs(loaded, pixels), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.usefixtures("scipy_available")
def test_mask2former_loss_trains_only_mona_and_head() -> None:
    model = get_peft_model(mask2former_swin(), MonaConfig(bottleneck_dim=8))
    model.train()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    out = model(pixel_values=pixels, mask_labels=[masks], class_labels=[torch.tensor([0, 2])])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".mona_" in n for n in with_grad)
    assert all(".mona_" in n or ".modules_to_save.default." in n for n in with_grad)


# ---------------------------------------------------------------------------------------------- default heads
@pytest.mark.parametrize(
    ("family", "expected"),
    [("vit", ["classifier"]), ("swin", ["classifier"]), ("deit", ["cls_classifier", "distillation_classifier"])],
)
def test_image_classifiers_default_to_their_classifier(family: str, expected: list[str]) -> None:
    model = get_peft_model(FAMILIES[family].build(), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == expected
    assert _trainable_owners(model) == {"mona", *expected}


def test_bare_backbones_have_no_head() -> None:
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2])
    for bare in (transformers.SwinModel(config), transformers.SwinBackbone(config)):
        model = get_peft_model(bare, MonaConfig(bottleneck_dim=8))
        assert model.peft_config["default"].modules_to_save is None
        assert _trainable_owners(model) == {"mona"}


def test_unfamiliar_models_get_no_guess() -> None:
    class Custom(torch.nn.Module):  # Swin blocks not inside a transformers Swin model
        def __init__(self) -> None:
            super().__init__()
            swin = transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1], num_heads=[2]))
            self.stages = swin.encoder.layers
            self.head = torch.nn.Linear(16, 2)

    model = Custom()
    blocks = [n for n in _blocks(model)]
    assert task_head_modules(model, blocks) is None


def test_loading_follows_the_saved_config_not_the_default(tmp_path: Path) -> None:
    """A saved adapter whose config has no head (e.g. saved before heads became the default) loads without one."""
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8, modules_to_save=[]))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = None
    config_file.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(upernet_swin(), tmp_path)
    assert loaded.peft_config["default"].modules_to_save is None
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in loaded.modules())
