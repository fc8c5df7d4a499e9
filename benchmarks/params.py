"""Trainable parameters of Mona (bottleneck 32/64/128) and of LoRA r=16 on q/v, and their share of the backbone.

Models are built from their configs on ``meta`` and given unwritten CPU storage (``to_empty``: address space, not
memory) before an adapter is added, since Mona refuses blocks on ``meta``. The adapter file size is that of
``adapter_model.safetensors`` from a real ``save_pretrained`` (fp32, adapter only).

    python -m benchmarks.params            # all models, Deformable DETR on Swin-B/L and the vision towers (~1 min)
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
from peft import PeftConfig, get_peft_model
from torch import nn

from benchmarks import common
from benchmarks.common import LORA_RANK, MODELS, count, lora_config, mona_config
from mona_peft import MonaConfig, MonaLayer
from mona_peft.training.recipe import lora_target_modules

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
    return [layer.hidden_size for layer in model.modules() if isinstance(layer, MonaLayer)]


def adapted(build: Callable[[], nn.Module], config: PeftConfig, inside: str = "") -> tuple[nn.Module, nn.Module, int]:
    """``build()`` on ``meta`` (the probe: counts and names), a PEFT model of a second copy given unwritten CPU storage
    (pages never written are never made resident), and its adapter parameters: all inside the sub-module named
    ``inside``, and for Mona equal to :func:`mona_formula`."""
    with torch.device("meta"):
        probe, base = build(), build()
    base = base.to_empty(device="cpu")
    base.tie_weights()  # to_empty gives each module its own storage: tie shared heads again (detectors, 5.x)
    model, mona = get_peft_model(base, config), isinstance(config, MonaConfig)
    names = {n: p.numel() for n, p in model.named_parameters() if (".mona_" if mona else "lora_") in n}
    if outside := [n for n in names if inside not in n]:
        raise AssertionError(f"adapter parameters outside {inside}: {outside[:3]}")
    params = sum(names.values())
    if mona and params != (formula := mona_formula(block_widths(model), config.bottleneck_dim, config.kernel_sizes)):
        raise AssertionError(f"{type(probe).__name__}: {params:,} Mona parameters, formula {formula:,}")
    return probe, model, params


def saved_adapter_bytes(peft_model: nn.Module) -> int:
    """Bytes of ``adapter_model.safetensors`` from ``save_pretrained``."""
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def official(key: str, mona_params: int, bottleneck: int) -> dict[str, Any]:
    """The official code's count at bottleneck 64 and whether Mona's matches it (None at another bottleneck)."""
    matches = mona_params == OFFICIAL_M64[key] if bottleneck == 64 else None
    return {"official_mona_params_m64": OFFICIAL_M64[key], "matches_official": matches}


def measure_model(spec: common.ModelSpec, bottlenecks: tuple[int, ...]) -> dict[str, Any]:
    """Backbone size, Mona at each bottleneck and LoRA r=16 on q/v for one classifier of the model zoo."""
    build = functools.partial(common.build_classifier, spec)
    entry: dict[str, Any] = {"key": spec.key, "name": spec.name, "family": spec.family, "mona": []}
    for m in bottlenecks:
        probe, model, params = adapted(build, mona_config(bottleneck_dim=m))
        backbone, widths = count(getattr(probe, probe.base_model_prefix).parameters()), block_widths(model)
        row = {
            "bottleneck": m,
            "params": params,
            "formula": mona_formula(widths, m),
            "share_of_backbone": params / backbone,
        }
        entry["mona"].append(row | {"adapter_file_bytes": saved_adapter_bytes(model)})
    entry |= {"blocks": len(widths), "block_widths": sorted(set(widths)), "backbone_params": backbone}
    _, model, params = adapted(build, lora_config(targets=(targets := lora_target_modules(probe))))
    entry["lora"] = {"rank": LORA_RANK, "targets": targets, "params": params, "share_of_backbone": params / backbone}
    entry["lora"]["adapter_file_bytes"] = saved_adapter_bytes(model)
    if spec.key in OFFICIAL_M64 and 64 in bottlenecks:
        entry |= official(spec.key, entry["mona"][bottlenecks.index(64)]["params"], 64)
    print(f"{spec.name:12s} backbone {backbone:>12,}  Mona {[r['params'] for r in entry['mona']]}  LoRA {params:,}")
    return entry


def heads_trained(model: nn.Module, mona: int, expected: int) -> int:
    """Trainable parameters besides Mona's, checked against ``expected``: MonaConfig's default ``modules_to_save``
    trains exactly the task heads."""
    if (trainable := count(p for p in model.parameters() if p.requires_grad) - mona) != expected:
        raise AssertionError(f"{trainable:,} parameters trained besides Mona, expected {expected:,}")
    return trainable


def measure_upernet_swin_l(bottleneck: int = 64) -> dict[str, Any]:
    """UperNet (ADE20K, 150 classes) with a Swin-L backbone: Mona in the backbone only, share of the backbone."""
    swin = MODELS["swin-l"].config(out_features=["stage1", "stage2", "stage3", "stage4"])
    config = tf.UperNetConfig(backbone_config=swin, num_labels=150)
    build = functools.partial(tf.UperNetForSemanticSegmentation, config)
    probe, model, mona = adapted(build, mona_config(bottleneck, default_heads=True), inside=".backbone.")
    backbone = count(probe.backbone.parameters())
    heads = {name: count(module.parameters()) for name, module in probe.named_children() if name != "backbone"}
    found = {"name": "UperNet-Swin-L", "bottleneck": bottleneck, "backbone_params": backbone, "head_params": heads}
    found |= {"mona_params": mona, "share_of_backbone": mona / backbone}
    found["trainable_with_heads"] = mona + heads_trained(model, mona, sum(heads.values()))
    return found | official("swin-l", mona, bottleneck)


def measure_detectors(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Deformable DETR (COCO: 91 labels, 4 feature levels from Swin stages 2-4) on Swin-B and Swin-L: Mona in the
    backbone only, the detector's own parts (MonaConfig's default ``modules_to_save``) beside it, LoRA r=16 on the
    backbone's q/v."""
    rows = []
    for key in ("swin-b", "swin-l"):
        spec, swin = MODELS[key], MODELS[key].config(out_features=["stage2", "stage3", "stage4"])
        kwargs = dict(backbone=None, use_timm_backbone=False, use_pretrained_backbone=False, num_feature_levels=4)
        config = tf.DeformableDetrConfig(backbone_config=swin, num_labels=91, **kwargs)
        build = functools.partial(tf.DeformableDetrForObjectDetection, config)
        probe, model, mona = adapted(build, mona_config(bottleneck, default_heads=True), inside=".backbone.")
        backbone, detector = count(probe.model.backbone.parameters()), count(probe.parameters())
        bare = probe.model.level_embed.numel()  # a bare parameter: modules_to_save cannot hold it, it stays frozen
        # LoRA on the backbone alone: PEFT 0.21 cannot wrap these detectors with LoRA on transformers 5.x
        # (`get_input_embeddings` not auto-handled, the error Mona works around); the count is the same.
        targets = lora_target_modules(probe)
        lora = adapted(functools.partial(tf.SwinBackbone, swin), lora_config(targets=targets))[2]
        row = {"name": f"Deformable DETR, {spec.name}", "backbone": spec.name, "blocks": len(block_widths(model))}
        row |= {"bottleneck": bottleneck, "backbone_params": backbone, "detector_params": detector}
        row |= {"mona_params": mona, "mona_share": mona / backbone}
        row |= {"detector_parts_params": heads_trained(model, mona, detector - backbone - bare)}
        row |= {"frozen_outside_backbone": bare, **official(key, mona, bottleneck)}
        rows.append(row | {"lora_params": lora, "lora_share": lora / backbone})
        print(f"{row['name']:28s} backbone {backbone:>12,}  Mona m={bottleneck} {mona:,}  LoRA {lora:,}")
    return rows


def measure_towers(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Mona (every block of the tower) next to LoRA r=16 on the attention projections, per vision tower."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl  # Qwen2-VL's tower is not exported

    rows = []
    for name, (model_class, config_class, kwargs, targets) in TOWERS.items():
        model_class = getattr(tf if hasattr(tf, model_class) else modeling_qwen2_vl, model_class)
        build = functools.partial(model_class, getattr(tf, config_class)(**kwargs))
        probe, model, mona = adapted(build, mona_config(bottleneck_dim=bottleneck))
        backbone, widths = count(probe.parameters()), block_widths(model)
        lora = adapted(build, lora_config(targets=targets))[2]
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
    start, bottlenecks = time.perf_counter(), (64,) if args.quick else BOTTLENECKS
    torch.manual_seed(0)
    payload: dict[str, Any] = {"benchmark": "params", "quick": args.quick, "machine": common.machine_info()}
    payload["settings"] = {"bottlenecks": list(bottlenecks), "lora_rank": LORA_RANK, "dtype": "float32"}
    models = QUICK_MODELS if args.quick else FULL_MODELS
    payload["models"] = [measure_model(MODELS[key], bottlenecks) for key in models]
    payload["upernet_swin_l"] = measure_upernet_swin_l()
    if not args.quick:
        payload |= {"detectors": measure_detectors(), "paper_coco_swin_b_params": PAPER_COCO_SWIN_B}
        payload["towers"] = measure_towers()
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = common.write_results("params_quick" if args.quick else "params", payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
