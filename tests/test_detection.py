"""Mona in the image backbone of DETR-family detectors: DETR, Deformable DETR (Swin and DINOv2 backbones, with and
without box refinement, two-stage) and Grounding DINO (Swin; its text encoder untouched), on tiny configs.

The default ``modules_to_save`` trains the detector's own parts. Deformable DETR and Grounding DINO keep their
per-level class and box heads in ``ModuleList`` entries that are one module repeated (transformers 4.57) or tied twins
(5.x), also reached through ``model.decoder``: every such path must use the one trained copy (see ``mona_peft.heads``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn

from mona_peft import MonaConfig, MonaLayer
from mona_peft.heads import twin_key
from tiny_models import randomize_adapter
from training_helpers import one_thread  # noqa: F401  (autouse: one torch thread)

pytest.importorskip("scipy", reason="the DETR family's Hungarian matcher needs scipy")

NUM_LABELS = 3
TEXT_LEN = 8
# Grounding DINO's classes are the phrases of the prompt, split by BERT's '.' (1012): '[CLS] a . b . c . [SEP]'
PROMPT = [101, 200, 1012, 300, 1012, 400, 1012, 102]


def _swin(stages: int = 3) -> transformers.SwinConfig:
    return transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1] * stages,
        num_heads=[1, 2, 2][:stages],
        window_size=2,
        out_features=[f"stage{i + 1}" for i in range(stages)],
    )


def _dinov2() -> transformers.Dinov2Config:
    return transformers.Dinov2Config(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2"],
    )


def _common(levels: int) -> dict:
    return dict(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        auxiliary_loss=True,
        **({"num_feature_levels": levels, "encoder_n_points": 2, "decoder_n_points": 2} if levels else {}),
    )


def detr_swin() -> nn.Module:
    config = transformers.DetrConfig(backbone_config=_swin(1), num_labels=NUM_LABELS, **_common(0))
    return transformers.DetrForObjectDetection(config)


def deformable(backbone: transformers.PretrainedConfig, **extra: bool | int) -> nn.Module:
    levels = len(backbone.out_features)
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone, num_labels=NUM_LABELS, **_common(levels), **extra
    )
    return transformers.DeformableDetrForObjectDetection(config)


def grounding_dino() -> nn.Module:
    text = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=1100,
        max_position_embeddings=32,
    )
    config = transformers.GroundingDinoConfig(
        backbone_config=_swin(), text_config=text, max_text_len=TEXT_LEN, **_common(3)
    )
    return transformers.GroundingDinoForObjectDetection(config)


DETECTORS: dict[str, Callable[[], nn.Module]] = {
    "detr-swin": detr_swin,
    "deformable-swin": lambda: deformable(_swin()),
    "deformable-swin-refine": lambda: deformable(_swin(), with_box_refine=True),
    "deformable-swin-two-stage": lambda: deformable(
        _swin(), with_box_refine=True, two_stage=True, two_stage_num_proposals=5
    ),
    "deformable-dinov2": lambda: deformable(_dinov2()),
    "grounding-dino-swin": grounding_dino,
}
BLOCKS = {"detr-swin": 1, "deformable-dinov2": 2, "grounding-dino-swin": 3}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DETECTORS[name]().eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    if name.startswith("grounding"):
        batch["input_ids"] = torch.tensor([PROMPT, PROMPT])
        batch["attention_mask"] = torch.ones(2, TEXT_LEN, dtype=torch.long)
    return batch


def targets(name: str) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5]])
    return [{"class_labels": torch.tensor([0, 2]), "boxes": boxes} for _ in range(2)]


def predictions(model: nn.Module, name: str) -> list[torch.Tensor]:
    """Logits and boxes of the final layer and of every auxiliary decoder level (returned with a loss only)."""
    out = model(**inputs(name), labels=targets(name))
    tensors = [out.logits, out.pred_boxes]
    for level in out.auxiliary_outputs or []:
        tensors += [level["logits"], level["pred_boxes"]]
    return tensors


def backbone_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("SwinLayer", "Dinov2Layer")]


def per_level_heads(inner: nn.Module) -> dict[str, nn.Module]:
    """Every path of a per-level class or box head that has parameters: the detector's and its decoder's lists."""
    found = {}
    for owner, prefix in ((inner, ""), (inner.model.decoder, "model.decoder.")):
        for attr in ("class_embed", "bbox_embed", "class_labels_classifier", "bbox_predictor"):
            heads = getattr(owner, attr, None)
            if heads is None:
                continue
            for index, head in enumerate(heads if isinstance(heads, nn.ModuleList) else [heads]):
                if any(True for _ in head.parameters()):
                    found[f"{prefix}{attr}.{index}"] = head
    return found


# ------------------------------------------------------------------------------------------------------ wrapping
@pytest.mark.parametrize("name", list(DETECTORS))
def test_mona_goes_into_the_image_backbone_only(name: str) -> None:
    base = build(name)
    blocks = backbone_blocks(base)
    assert len(blocks) == BLOCKS.get(name, 3)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    wrapped = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MonaLayer)]
    assert sorted(wrapped) == sorted(blocks) and all(n.startswith("model.backbone.") for n in wrapped)

    inner = model.base_model.model
    trainable = [n for n, p in inner.named_parameters() if p.requires_grad]
    in_backbone = [n for n in trainable if n.startswith("model.backbone.")]
    assert in_backbone and all(".mona_" in n for n in in_backbone)  # the backbone is frozen except Mona
    assert all(".mona_" in n or ".modules_to_save.default." in n for n in trainable)
    saved = model.peft_config["default"].modules_to_save
    assert not any(s.startswith("model.backbone") for s in saved)
    # the detector's own parts are trained: input projection, encoder, decoder, queries (unless two-stage), heads
    for part in ("input_proj", "encoder.", "decoder.", "query_position_embeddings", "embed", "classifier"):
        if part == "query_position_embeddings" and "two-stage" in name:
            continue
        if part == "classifier" and not name.startswith("detr"):
            continue
        if part == "embed" and name.startswith("detr"):
            continue
        assert any(part in n for n in trainable), (part, saved)
    # every per-level head path uses a trained copy, and paths that hold one module (or tied twins) share it
    heads = per_level_heads(inner)
    assert heads and all(isinstance(h, ModulesToSaveWrapper) for h in heads.values()), heads.keys()
    if name == "deformable-swin" or name == "deformable-dinov2" or name == "grounding-dino-swin":
        # without box refinement all levels share one class head and one box head (4.57: one module; 5.x: ties)
        assert len({id(h) for p, h in heads.items() if "bbox_embed" in p}) == 1
    if name.startswith("grounding"):
        text = inner.model.text_backbone
        assert not any(p.requires_grad for p in text.parameters())
        assert not any(isinstance(m, (ModulesToSaveWrapper, MonaLayer)) for m in text.modules())
        assert not any(s.startswith(("model.text_backbone", "model.text_projection")) for s in saved)


def test_deformable_default_heads() -> None:
    saved = get_peft_model(build("deformable-swin"), MonaConfig(bottleneck_dim=8)).peft_config["default"]
    # one entry per distinct per-level head; `model.encoder` named whole where no backbone path ends with it
    assert "class_embed.0" in saved.modules_to_save and "bbox_embed.0" in saved.modules_to_save
    assert not any(s.startswith(("class_embed.1", "bbox_embed.1")) for s in saved.modules_to_save)
    assert {"model.input_proj.0", "model.input_proj.1", "model.input_proj.2"} <= set(saved.modules_to_save)


def test_explicit_modules_to_save_wins() -> None:
    model = get_peft_model(build("deformable-swin"), MonaConfig(bottleneck_dim=8, modules_to_save=[]))
    assert not model.peft_config["default"].modules_to_save
    assert all(".mona_" in n for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("name", list(DETECTORS))
def test_identity_at_default_init(name: str) -> None:
    base = build(name)
    with torch.no_grad():
        expected = predictions(base, name)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8)).eval()
    with torch.no_grad():
        got = predictions(model, name)
        with model.disable_adapter():
            disabled = predictions(model, name)
    for a, b, c in zip(got, expected, disabled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_one_step_changes_every_prediction_path(name: str) -> None:
    base = build(name)
    ties = {path: twin_key(head) for path, head in per_level_heads(base).items()}  # one module, or tied twins
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    inner = model.base_model.model
    text_before = (
        {k: v.clone() for k, v in inner.model.text_backbone.state_dict().items()}
        if name.startswith("grounding")
        else {}
    )
    backbone_before = {k: v.clone() for k, v in inner.model.backbone.state_dict().items() if ".mona_" not in k}
    probe = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    heads = per_level_heads(inner)
    with torch.no_grad():
        head_before = {p: h(probe) for p, h in heads.items() if "class_embed" not in p or not name.startswith("g")}
        before = predictions(model, name)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**inputs(name), labels=targets(name))
    out.loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = predictions(model, name)
        for path, value in head_before.items():  # each path computes with a trained copy
            if "two-stage" in name and path.endswith(f"_embed.{inner.config.decoder_layers}"):
                # two-stage's last class and box heads only make the encoder's proposals: transformers' loss has no
                # term for them (top-k selection), so no gradient reaches them
                assert isinstance(heads[path], ModulesToSaveWrapper)
                continue
            assert not torch.equal(heads[path](probe), value), path
    assert len(before) >= 4  # final + at least one auxiliary level
    for index, (a, b) in enumerate(zip(before, after, strict=True)):
        assert not torch.allclose(a, b), index
    for key, value in inner.model.backbone.state_dict().items():
        if ".mona_" not in key:
            assert torch.equal(value, backbone_before[key]), key
    for key, value in text_before.items():
        assert torch.equal(inner.model.text_backbone.state_dict()[key], value), key
    # tied heads stay tied: paths that held one module or tied twins still hold one trained copy
    for path, key in ties.items():
        assert all(heads[other] is heads[path] for other, k in ties.items() if k == key), path


@pytest.mark.parametrize("name", ["deformable-swin", "deformable-swin-refine", "grounding-dino-swin", "detr-swin"])
def test_loss_decreases_on_a_fixed_batch(name: str) -> None:
    model = get_peft_model(build(name), MonaConfig(bottleneck_dim=8))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**inputs(name), labels=targets(name)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for layer in model.modules():
        if isinstance(layer, MonaLayer):
            assert layer.mona_mlp["default"].up.weight.grad.abs().sum() > 0


@torch.no_grad()
def _perturb_heads(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if ".modules_to_save.default." in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_save_and_reload_give_identical_predictions(name: str, tmp_path: Path) -> None:
    model = get_peft_model(build(name), MonaConfig(bottleneck_dim=8)).eval()
    randomize_adapter(model)
    _perturb_heads(model)
    with torch.no_grad():
        expected = predictions(model, name)
        with model.disable_adapter():
            assert not torch.allclose(predictions(model, name)[0], expected[0])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(name), tmp_path).eval()
    assert loaded.peft_config["default"].modules_to_save == model.peft_config["default"].modules_to_save
    with torch.no_grad():
        for got, want in zip(predictions(loaded, name), expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["deformable-swin", "deformable-swin-refine", "grounding-dino-swin"])
def test_unload_restores_every_path(name: str) -> None:
    base = build(name)
    originals = dict(base.named_modules(remove_duplicate=False))
    with torch.no_grad():
        expected = predictions(base, name)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    restored = model.unload()
    assert not any(isinstance(m, (ModulesToSaveWrapper, MonaLayer)) for m in restored.modules())
    now = dict(restored.named_modules(remove_duplicate=False))
    assert now.keys() == originals.keys()
    assert all(now[b] is originals[b] for b in backbone_blocks(base))
    # PEFT's unload keeps the trained copy of each head; every path of a shared head gets that one copy
    before, after = per_level_heads(base), per_level_heads(restored)
    for path, head in before.items():
        twins = [p for p, h in before.items() if h is head or twin_key(h) == twin_key(head)]
        assert all(after[p] is after[path] for p in twins), (path, twins)
    with torch.no_grad():
        for got, want in zip(predictions(restored, name), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_head_without_an_unambiguous_name_is_refused() -> None:
    class Tagger(nn.Module):  # PEFT matches modules_to_save by suffix: "head" would also wrap "x_head"
        def __init__(self) -> None:
            super().__init__()
            self.vit = transformers.ViTModel(
                transformers.ViTConfig(
                    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16
                )
            )
            self.head = nn.Linear(16, 2)
            self.x_head = nn.Linear(16, 2)

    with pytest.raises(ValueError, match="Pass `modules_to_save` explicitly"):
        get_peft_model(Tagger(), MonaConfig(bottleneck_dim=8))
