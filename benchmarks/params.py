"""Trainable parameters of Mona (bottleneck 32/64/128) and of LoRA r=16 on q/v, and their share of the backbone.

Models are built from their configs on the ``meta`` device and given uninitialised CPU storage (``to_empty``: address
space, not memory) before an adapter is added, since Mona refuses blocks whose weights are on ``meta``. The adapter
file size is that of ``adapter_model.safetensors`` from a real ``save_pretrained`` (fp32, adapter only).

    python -m benchmarks.params            # all models, Deformable DETR on Swin-B/L and the vision towers (minutes)
    python -m benchmarks.params --quick    # Swin-T and Swin-L at bottleneck 64 only (smoke test)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from peft import get_peft_model
from torch import nn

import mona_peft  # noqa: F401  (registers the "mona" PEFT method)
from benchmarks.common import (
    LORA_RANK,
    MODELS,
    ModelSpec,
    backbone_of,
    build_classifier,
    count,
    lora_config,
    lora_target_modules,
    machine_info,
    mona_config,
    write_results,
)
from mona_peft.families import layout_for
from mona_peft.layer import block_hidden_size

# Mona parameter counts of the official code at bottleneck 64, from its training logs (see docs/benchmarks.md).
OFFICIAL_M64 = {"swin-t": 1_408_128, "swin-s": 2_867_328, "swin-b": 3_667_456, "swin-l": 5_267_712}
PAPER_COCO_SWIN_B = 4_200_000  # the paper's COCO table: Mona's trainable parameters for Swin-B (rounded)
FULL_MODELS = ("swin-t", "swin-s", "swin-b", "swin-l", "vit-b", "vit-l", "dinov2-s", "dinov2-b")
QUICK_MODELS = ("swin-t", "swin-l")
BOTTLENECKS = (32, 64, 128)
_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_QV = ["q_proj", "v_proj"]
# The vision towers people fine-tune today, at their published sizes: model and config classes, config, LoRA targets
# (q/v, or the fused qkv projection where the tower has one).
TOWERS = {
    "CLIP ViT-L/14 (vision)": ("CLIPVisionModel", "CLIPVisionConfig", {**_VIT_L, "patch_size": 14, "image_size": 224},
                               _QV),
    "SigLIP so400m/14 (vision)": ("SiglipVisionModel", "SiglipVisionConfig", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
        image_size=384), _QV),
    "DINOv3 ViT-L/16": ("DINOv3ViTModel", "DINOv3ViTConfig", {**_VIT_L, "patch_size": 16, "num_register_tokens": 4},
                        _QV),
    "SAM ViT-H (image encoder)": ("SamVisionModel", "SamVisionConfig", dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
        global_attn_indexes=[7, 15, 23, 31]), ["qkv"]),
    "Qwen2-VL vision tower": ("Qwen2VisionTransformerPretrainedModel", "Qwen2VLVisionConfig", dict(
        depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584), ["qkv"]),
}  # fmt: skip


def mona_formula(hidden_sizes: list[int], bottleneck: int, kernel_sizes: tuple[int, ...] = (3, 5, 7)) -> int:
    """Closed-form Mona parameter count: per Mona ``2Cm + 5C + m^2 + (2 + sum k^2 + len(k)) m`` (``88m`` at kernels
    3/5/7), two per block."""
    m, per_m = bottleneck, 2 + sum(k * k for k in kernel_sizes) + len(kernel_sizes)
    return sum(2 * (2 * c * m + 5 * c + m * m + per_m * m) for c in hidden_sizes)


def block_widths(model: nn.Module) -> list[int]:
    """Residual width of every transformer block Mona wraps (one entry per block)."""
    return [block_hidden_size(m) for _, m in model.named_modules() if layout_for(m) is not None]


def adapted(build: Callable[[], nn.Module], config: Any) -> tuple[nn.Module, nn.Module]:
    """``build()`` on ``meta``, and a PEFT model of a second copy given unwritten CPU storage (parameter counts and
    shapes are all that is read from the base; pages never written are never made resident)."""
    with torch.device("meta"):
        probe, base = build(), build()
    base = base.to_empty(device="cpu")
    base.tie_weights()  # to_empty gives each module its own storage: tie shared heads again (detectors, 5.x)
    return probe, get_peft_model(base, config)


def adapter_params(model: nn.Module, marker: str = ".mona_", inside: str | None = None) -> int:
    """Parameters whose name contains ``marker``; with ``inside``, refuse any outside that sub-module."""
    names = [n for n, _ in model.named_parameters() if marker in n]
    if inside and (outside := [n for n in names if inside not in n]):
        raise AssertionError(f"Mona parameters outside the backbone: {outside[:3]}")
    return count(p for n, p in model.named_parameters() if marker in n)


def saved_adapter_bytes(peft_model: nn.Module) -> int:
    """Bytes of ``adapter_model.safetensors`` from ``save_pretrained`` (meta adapter weights made real zeros first)."""
    for module in peft_model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.device.type == "meta":
                setattr(module, name, nn.Parameter(torch.zeros(param.shape, dtype=param.dtype)))
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def _check_formula(name: str, params: int, widths: list[int], bottleneck: int) -> None:
    if params != mona_formula(widths, bottleneck):
        raise AssertionError(f"{name}: {params:,} Mona parameters, formula {mona_formula(widths, bottleneck):,}")


def measure_model(spec: ModelSpec, bottlenecks: tuple[int, ...]) -> dict[str, Any]:
    """Backbone size, Mona at each bottleneck and LoRA r=16 on q/v for one model."""
    entry: dict[str, Any] = {"key": spec.key, "name": spec.name, "family": spec.family, "mona": []}
    for m in bottlenecks:
        probe, model = adapted(lambda: build_classifier(spec), mona_config(bottleneck_dim=m))
        backbone, widths, params = count(backbone_of(probe).parameters()), block_widths(probe), adapter_params(model)
        share = {"share_of_backbone": params / backbone, "adapter_file_bytes": saved_adapter_bytes(model)}
        entry["mona"].append({"bottleneck": m, "params": params, "formula": mona_formula(widths, m), **share})
    entry |= {"blocks": len(widths), "block_widths": sorted(set(widths)), "backbone_params": backbone}
    targets = lora_target_modules(probe)
    probe, model = adapted(lambda: build_classifier(spec), lora_config(targets=targets))
    params = adapter_params(model, "lora_")
    entry["lora"] = {"rank": LORA_RANK, "targets": targets, "params": params, "share_of_backbone": params / backbone}
    entry["lora"]["adapter_file_bytes"] = saved_adapter_bytes(model)
    if spec.key in OFFICIAL_M64 and 64 in bottlenecks:
        entry["official_mona_params_m64"] = OFFICIAL_M64[spec.key]
        entry["matches_official"] = entry["mona"][bottlenecks.index(64)]["params"] == OFFICIAL_M64[spec.key]
    return entry


def measure_upernet_swin_l(bottleneck: int = 64) -> dict[str, Any]:
    """UperNet (ADE20K, 150 classes) with a Swin-L backbone: Mona in the backbone only, share of the backbone."""
    backbone_config = MODELS["swin-l"].config(out_features=["stage1", "stage2", "stage3", "stage4"])
    config = tf.UperNetConfig(backbone_config=backbone_config, num_labels=150)
    build = functools.partial(tf.UperNetForSemanticSegmentation, config)
    probe, model = adapted(build, mona_config(bottleneck_dim=bottleneck, default_heads=True))
    backbone, params = count(probe.backbone.parameters()), adapter_params(model, inside=".backbone.")
    heads = {name: count(module.parameters()) for name, module in probe.named_children() if name != "backbone"}
    trainable = count(p for p in model.parameters() if p.requires_grad)
    if trainable != params + sum(heads.values()):  # MonaConfig's default trains exactly the heads besides Mona
        raise AssertionError(f"{trainable:,} trainable, expected Mona + heads = {params + sum(heads.values()):,}")
    found = {"name": "UperNet-Swin-L", "bottleneck": bottleneck, "backbone_params": backbone, "head_params": heads}
    found |= {"mona_params": params, "share_of_backbone": params / backbone, "trainable_with_heads": trainable}
    official = OFFICIAL_M64["swin-l"]
    return found | {
        "official_mona_params_m64": official,
        "matches_official": params == official if bottleneck == 64 else None,
    }


def measure_detectors(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Deformable DETR (COCO: 91 labels, 4 feature levels from Swin stages 2-4) on Swin-B and Swin-L: Mona in the
    backbone only, the detector's own parts (MonaConfig's default ``modules_to_save``) beside it, LoRA r=16 on the
    backbone's q/v."""
    rows = []
    for key in ("swin-b", "swin-l"):
        spec, levels = MODELS[key], ["stage2", "stage3", "stage4"]
        config = tf.DeformableDetrConfig(backbone_config=spec.config(out_features=levels), backbone=None,
                                         use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
                                         num_feature_levels=4)  # fmt: skip
        build = functools.partial(tf.DeformableDetrForObjectDetection, config)
        probe, model = adapted(build, mona_config(bottleneck, default_heads=True))
        backbone, detector, widths = (
            count(probe.model.backbone.parameters()),
            count(probe.parameters()),
            block_widths(probe),
        )
        mona = adapter_params(model, inside=".backbone.")
        _check_formula(key, mona, widths, bottleneck)
        trainable = count(p for p in model.parameters() if p.requires_grad) - mona
        bare = probe.model.level_embed.numel()  # a bare parameter: modules_to_save cannot hold it, it stays frozen
        if trainable != detector - backbone - bare:
            raise AssertionError(f"{key}: {trainable:,} trained besides Mona, expected {detector - backbone - bare:,}")
        # LoRA on the backbone alone: PEFT 0.21 cannot wrap these detectors with LoRA on transformers 5.x
        # (`get_input_embeddings` not auto-handled, the error Mona works around); the count is the same.
        swin = functools.partial(tf.SwinBackbone, spec.config(out_features=levels))
        lora = adapter_params(adapted(swin, lora_config(targets=lora_target_modules(probe)))[1], "lora_")
        row = {"name": f"Deformable DETR, {spec.name}", "backbone": spec.name, "blocks": len(widths)}
        row |= {"bottleneck": bottleneck, "backbone_params": backbone, "detector_params": detector}
        row |= {"mona_params": mona, "mona_share": mona / backbone, "detector_parts_params": trainable}
        row |= {"frozen_outside_backbone": bare, "official_mona_params_m64": OFFICIAL_M64[key]}
        row |= {"matches_official": mona == OFFICIAL_M64[key] if bottleneck == 64 else None}
        rows.append(row | {"lora_params": lora, "lora_share": lora / backbone})
        print(f"{row['name']:28s} backbone {backbone:>12,}  Mona m={bottleneck} {mona:,}  LoRA {lora:,}")
    return rows


def _tower(model_class: str, config_class: str, kwargs: dict[str, Any]) -> nn.Module:
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    config = getattr(tf, config_class)(**kwargs)
    if hasattr(tf, model_class):
        return getattr(tf, model_class)(config)
    return getattr(modeling_qwen2_vl, model_class)._from_config(config)  # Qwen2-VL's tower is not exported


def measure_towers(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Mona (every block of the tower) next to LoRA r=16 on the attention projections, per vision tower."""
    rows = []
    for name, (model_class, config_class, kwargs, targets) in TOWERS.items():
        build = functools.partial(_tower, model_class, config_class, kwargs)
        probe, model = adapted(build, mona_config(bottleneck_dim=bottleneck))
        backbone, widths, mona = count(probe.parameters()), block_widths(probe), adapter_params(model)
        _check_formula(name, mona, widths, bottleneck)
        lora = adapter_params(adapted(build, lora_config(targets=targets))[1], "lora_")
        row = {"name": name, "blocks": len(widths), "width": widths[0], "backbone_params": backbone}
        row |= {"bottleneck": bottleneck, "mona_params": mona, "mona_share": mona / backbone, "lora_targets": targets}
        rows.append(row | {"lora_params": lora, "lora_share": lora / backbone})
        print(f"{name:28s} {backbone:>13,}  Mona m={bottleneck} {mona:,}  LoRA {lora:,}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Count, print and write ``params.json`` (``params_quick.json`` with ``--quick``); returns what it wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Swin-T and Swin-L at bottleneck 64 only")
    parser.add_argument("--results-dir", type=Path, default=None, help="where to write params.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    bottlenecks = (64,) if args.quick else BOTTLENECKS
    settings = {"bottlenecks": list(bottlenecks), "lora_rank": LORA_RANK, "dtype": "float32"}
    payload: dict[str, Any] = {
        "benchmark": "params",
        "quick": args.quick,
        "machine": machine_info(),
        "settings": settings,
    }
    payload["models"] = []
    for key in QUICK_MODELS if args.quick else FULL_MODELS:
        payload["models"].append(entry := measure_model(MODELS[key], bottlenecks))
        shares = ", ".join(
            f"m={r['bottleneck']}: {r['params']:,} ({r['share_of_backbone']:.2%})" for r in entry["mona"]
        )
        lora = entry["lora"]["params"]
        print(f"{entry['name']:12s} backbone {entry['backbone_params']:>12,}  Mona {shares}  LoRA {lora:,}")
    payload["upernet_swin_l"] = measure_upernet_swin_l()
    if not args.quick:
        payload |= {"detectors": measure_detectors(), "paper_coco_swin_b_params": PAPER_COCO_SWIN_B}
        payload["towers"] = measure_towers()
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = write_results("params_quick" if args.quick else "params", payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
