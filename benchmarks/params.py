"""Trainable parameters of Mona (bottleneck 32/64/128) and of LoRA r=16 on q/v, and their share of the backbone.

Models are built from their configs on the ``meta`` device (no weights, no downloads) and given uninitialised CPU
storage (``to_empty``: allocated, never written, so it costs address space rather than memory) before an adapter is
added, since Mona refuses blocks whose weights are on ``meta`` with nothing to load them. The adapter file size is the
size of ``adapter_model.safetensors`` written by a real ``save_pretrained`` (fp32, adapter only, no task head).

    python -m benchmarks.params            # all models, Deformable DETR on Swin-B/L and the vision towers (minutes)
    python -m benchmarks.params --quick    # Swin-T and Swin-L at bottleneck 64 only (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
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

# Mona parameter counts of the official code at bottleneck 64, from its training logs (see docs/benchmarks.md).
OFFICIAL_M64 = {"swin-t": 1_408_128, "swin-s": 2_867_328, "swin-b": 3_667_456, "swin-l": 5_267_712}
# The paper's published benchmark tables: Mona's trainable parameters for the Swin-B detector on COCO (rounded).
PAPER_COCO_SWIN_B = 4_200_000
FULL_MODELS = ("swin-t", "swin-s", "swin-b", "swin-l", "vit-b", "vit-l", "dinov2-s", "dinov2-b")
QUICK_MODELS = ("swin-t", "swin-l")
BOTTLENECKS = (32, 64, 128)


def mona_formula(hidden_sizes: list[int], bottleneck: int, kernel_sizes: tuple[int, ...] = (3, 5, 7)) -> int:
    """Closed-form Mona parameter count: per Mona ``2Cm + 5C + m^2 + (2 + sum k^2 + len(k)) m``, two per block.

    At kernels 3/5/7 the last term is ``88m`` (see /work/shared/notes/mona-method.md).
    """
    m = bottleneck
    per_m = 2 + sum(k * k for k in kernel_sizes) + len(kernel_sizes)
    return sum(2 * (2 * c * m + 5 * c + m * m + per_m * m) for c in hidden_sizes)


def block_widths(model: nn.Module) -> list[int]:
    """Residual width of every transformer block Mona wraps (one entry per block)."""
    from mona_peft.families import layout_for
    from mona_peft.layer import block_hidden_size

    return [block_hidden_size(m) for _, m in model.named_modules() if layout_for(m) is not None]


def adapter_params(model: nn.Module, marker: str) -> int:
    return count(p for name, p in model.named_parameters() if marker in name)


def unwritten(model: nn.Module) -> nn.Module:
    """``model`` (built on ``meta``) with uninitialised CPU storage: parameter counts and shapes are all that is read
    from the base, and pages that are never written are never made resident."""
    return model.to_empty(device="cpu")


def saved_adapter_bytes(peft_model: nn.Module) -> int:
    """Bytes of ``adapter_model.safetensors`` from ``save_pretrained`` (meta adapter weights made real zeros first)."""
    for module in peft_model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and param.device.type == "meta":
                module._parameters[name] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype))
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def measure_model(spec: ModelSpec, bottlenecks: tuple[int, ...]) -> dict[str, Any]:
    """Backbone size, Mona at each bottleneck and LoRA r=16 on q/v for one model."""
    with torch.device("meta"):
        probe = build_classifier(spec)
    backbone = count(backbone_of(probe).parameters())
    widths = block_widths(probe)
    entry: dict[str, Any] = {
        "key": spec.key,
        "name": spec.name,
        "family": spec.family,
        "blocks": len(widths),
        "block_widths": sorted(set(widths)),
        "backbone_params": backbone,
        "mona": [],
    }
    for m in bottlenecks:
        with torch.device("meta"):
            base = build_classifier(spec)
        model = get_peft_model(unwritten(base), mona_config(bottleneck_dim=m))
        params = adapter_params(model, ".mona_")
        entry["mona"].append(
            {
                "bottleneck": m,
                "params": params,
                "formula": mona_formula(widths, m),
                "share_of_backbone": params / backbone,
                "adapter_file_bytes": saved_adapter_bytes(model),
            }
        )
    with torch.device("meta"):
        base = build_classifier(spec)
    model = get_peft_model(unwritten(base), lora_config(base))
    params = adapter_params(model, "lora_")
    entry["lora"] = {
        "rank": LORA_RANK,
        "targets": lora_target_modules(base),
        "params": params,
        "share_of_backbone": params / backbone,
        "adapter_file_bytes": saved_adapter_bytes(model),
    }
    official = OFFICIAL_M64.get(spec.key)
    if official is not None and 64 in bottlenecks:
        counted = next(r["params"] for r in entry["mona"] if r["bottleneck"] == 64)
        entry["official_mona_params_m64"] = official
        entry["matches_official"] = counted == official
    return entry


def measure_upernet_swin_l(bottleneck: int = 64) -> dict[str, Any]:
    """UperNet (ADE20K, 150 classes) with a Swin-L backbone: Mona in the backbone only, share of the backbone."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone_config = MODELS["swin-l"].config(out_features=["stage1", "stage2", "stage3", "stage4"])
    with torch.device("meta"):
        base = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, num_labels=150))
        backbone = count(base.backbone.parameters())
        heads = {name: count(module.parameters()) for name, module in base.named_children() if name != "backbone"}
    model = get_peft_model(unwritten(base), mona_config(bottleneck_dim=bottleneck, default_heads=True))
    outside = [n for n, _ in model.named_parameters() if ".mona_" in n and ".backbone." not in n]
    if outside:
        raise AssertionError(f"Mona parameters outside the backbone: {outside[:3]}")
    params = adapter_params(model, ".mona_")
    trainable = count(p for p in model.parameters() if p.requires_grad)
    if trainable != params + sum(heads.values()):  # MonaConfig's default trains exactly the heads besides Mona
        raise AssertionError(f"{trainable:,} trainable, expected Mona + heads = {params + sum(heads.values()):,}")
    return {
        "name": "UperNet-Swin-L",
        "bottleneck": bottleneck,
        "backbone_params": backbone,
        "head_params": heads,
        "mona_params": params,
        "share_of_backbone": params / backbone,
        "trainable_with_heads": params + sum(heads.values()),
        "official_mona_params_m64": OFFICIAL_M64["swin-l"],
        "matches_official": params == OFFICIAL_M64["swin-l"] if bottleneck == 64 else None,
    }


def measure_detectors(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Deformable DETR (COCO: 91 labels, 4 feature levels from Swin stages 2-4) on a Swin-B and a Swin-L backbone: Mona
    in the backbone only, the detector's own parts (MonaConfig's default ``modules_to_save``) beside it, and LoRA r=16
    on the backbone's q/v."""
    from peft import LoraConfig
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, SwinBackbone

    rows = []
    for key in ("swin-b", "swin-l"):
        spec = MODELS[key]

        def build(spec: ModelSpec = spec) -> nn.Module:
            config = DeformableDetrConfig(
                backbone_config=spec.config(out_features=["stage2", "stage3", "stage4"]),
                backbone=None,
                use_timm_backbone=False,
                use_pretrained_backbone=False,
                num_labels=91,
                num_feature_levels=4,
            )
            with torch.device("meta"):
                return DeformableDetrForObjectDetection(config)

        probe = build()
        backbone = count(probe.model.backbone.parameters())
        detector = count(probe.parameters())
        widths = block_widths(probe)
        base = unwritten(probe)
        base.tie_weights()  # to_empty gives each module its own storage: tie the per-level heads again (5.x)
        model = get_peft_model(base, mona_config(bottleneck_dim=bottleneck, default_heads=True))
        outside = [n for n, _ in model.named_parameters() if ".mona_" in n and ".backbone." not in n]
        if outside:
            raise AssertionError(f"Mona parameters outside the backbone: {outside[:3]}")
        mona_params = adapter_params(model, ".mona_")
        if mona_params != mona_formula(widths, bottleneck):
            raise AssertionError(
                f"{key}: {mona_params:,} Mona parameters, formula {mona_formula(widths, bottleneck):,}"
            )
        trainable = count(p for p in model.parameters() if p.requires_grad)
        bare = probe.model.level_embed.numel()  # a bare parameter: modules_to_save cannot hold it, it stays frozen
        if trainable - mona_params != detector - backbone - bare:
            raise AssertionError(
                f"{key}: {trainable - mona_params:,} trained besides Mona, expected {detector - backbone - bare:,}"
            )
        # LoRA on the same backbone alone: PEFT 0.21 cannot wrap these detectors with LoRA on transformers 5.x
        # (`get_input_embeddings` not auto-handled, the error Mona works around); the count is the same.
        with torch.device("meta"):
            backbone_only = SwinBackbone(spec.config(out_features=["stage2", "stage3", "stage4"]))
        lora_targets = lora_target_modules(backbone_only)
        lora = get_peft_model(
            unwritten(backbone_only), LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=lora_targets)
        )
        lora_params = adapter_params(lora, "lora_")
        rows.append(
            {
                "name": f"Deformable DETR, {spec.name}",
                "backbone": spec.name,
                "blocks": len(widths),
                "bottleneck": bottleneck,
                "backbone_params": backbone,
                "detector_params": detector,
                "mona_params": mona_params,
                "mona_share": mona_params / backbone,
                "detector_parts_params": trainable - mona_params,
                "frozen_outside_backbone": bare,
                "official_mona_params_m64": OFFICIAL_M64[key],
                "matches_official": mona_params == OFFICIAL_M64[key] if bottleneck == 64 else None,
                "lora_params": lora_params,
                "lora_share": lora_params / backbone,
            }
        )
        name = rows[-1]["name"]
        print(f"{name:28s} backbone {backbone:>12,}  Mona m={bottleneck} {mona_params:,}  LoRA {lora_params:,}")
    return rows


def _towers() -> dict[str, tuple[Any, list[str]]]:
    """The vision towers people fine-tune today, at their published sizes: (build on meta, LoRA's q/v targets)."""
    import transformers as tf
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    qv = ["q_proj", "v_proj"]
    return {
        "CLIP ViT-L/14 (vision)": (
            lambda: tf.CLIPVisionModel(
                tf.CLIPVisionConfig(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    patch_size=14,
                    image_size=224,
                )
            ),
            qv,
        ),
        "SigLIP so400m/14 (vision)": (
            lambda: tf.SiglipVisionModel(
                tf.SiglipVisionConfig(
                    hidden_size=1152,
                    intermediate_size=4304,
                    num_hidden_layers=27,
                    num_attention_heads=16,
                    patch_size=14,
                    image_size=384,
                )
            ),
            qv,
        ),
        "DINOv3 ViT-L/16": (
            lambda: tf.DINOv3ViTModel(
                tf.DINOv3ViTConfig(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    patch_size=16,
                    num_register_tokens=4,
                )
            ),
            qv,
        ),
        "SAM ViT-H (image encoder)": (
            lambda: tf.SamVisionModel(
                tf.SamVisionConfig(
                    hidden_size=1280,
                    num_hidden_layers=32,
                    num_attention_heads=16,
                    mlp_dim=5120,
                    global_attn_indexes=[7, 15, 23, 31],
                )
            ),
            ["qkv"],  # one fused projection: LoRA on all of q, k and v
        ),
        "Qwen2-VL vision tower": (
            lambda: Qwen2VisionTransformerPretrainedModel._from_config(
                Qwen2VLVisionConfig(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584)
            ),
            ["qkv"],
        ),
    }


def measure_towers(bottleneck: int = 64) -> list[dict[str, Any]]:
    """Mona (every block of the tower) next to LoRA r=16 on the attention projections, per vision tower."""
    from peft import LoraConfig

    rows = []
    for name, (build, targets) in _towers().items():
        with torch.device("meta"):
            probe = build()
        backbone = count(probe.parameters())
        widths = block_widths(probe)
        mona = get_peft_model(unwritten(probe), mona_config(bottleneck_dim=bottleneck))
        with torch.device("meta"):
            base = build()
        lora = get_peft_model(unwritten(base), LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
        mona_params = adapter_params(mona, ".mona_")
        if mona_params != mona_formula(widths, bottleneck):
            raise AssertionError(
                f"{name}: {mona_params:,} Mona parameters, formula {mona_formula(widths, bottleneck):,}"
            )
        lora_params = adapter_params(lora, "lora_")
        rows.append(
            {
                "name": name,
                "blocks": len(widths),
                "width": widths[0],
                "backbone_params": backbone,
                "bottleneck": bottleneck,
                "mona_params": mona_params,
                "mona_share": mona_params / backbone,
                "lora_targets": targets,
                "lora_params": lora_params,
                "lora_share": lora_params / backbone,
            }
        )
        print(f"{name:28s} {backbone:>13,}  Mona m={bottleneck} {mona_params:,}  LoRA {lora_params:,}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Swin-T and Swin-L at bottleneck 64 only")
    parser.add_argument("--results-dir", type=Path, default=None, help="where to write params.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.manual_seed(0)
    keys = QUICK_MODELS if args.quick else FULL_MODELS
    bottlenecks = (64,) if args.quick else BOTTLENECKS
    payload: dict[str, Any] = {
        "benchmark": "params",
        "quick": args.quick,
        "machine": machine_info(),
        "settings": {"bottlenecks": list(bottlenecks), "lora_rank": LORA_RANK, "dtype": "float32"},
        "models": [],
    }
    for key in keys:
        entry = measure_model(MODELS[key], bottlenecks)
        payload["models"].append(entry)
        shares = ", ".join(
            f"m={r['bottleneck']}: {r['params']:,} ({r['share_of_backbone']:.2%})" for r in entry["mona"]
        )
        lora = entry["lora"]["params"]
        print(f"{entry['name']:12s} backbone {entry['backbone_params']:>12,}  Mona {shares}  LoRA {lora:,}")
    payload["upernet_swin_l"] = measure_upernet_swin_l()
    if not args.quick:
        payload["detectors"] = measure_detectors()
        payload["paper_coco_swin_b_params"] = PAPER_COCO_SWIN_B
        payload["towers"] = measure_towers()
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = write_results("params_quick" if args.quick else "params", payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
