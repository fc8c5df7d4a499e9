"""The text of ``docs/profile.md``: ``templates/profile.md`` with the numbers of ``benchmarks/results/profile.json``
filled in.

Called by :mod:`benchmarks.report`; the tables come from there, the numbers in the prose from here, so a rerun of the
profile updates every figure in the prose as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.profile_mona import (  # the stage labels the profile records
    GLUE_BACKWARD,
    GLUE_FORWARD,
    STAGE_CAT,
    STAGE_CONV,
    STAGE_DOWN,
    STAGE_GELU,
    STAGE_GRID,
    STAGE_MERGE,
    STAGE_NORM,
    STAGE_NORM_DOWN,
    STAGE_PROJ,
    STAGE_UP,
)

TEMPLATE = Path(__file__).with_name("templates") / "profile.md"


def _total(stage: dict[str, float]) -> float:
    return stage["forward_ms"] + stage["backward_ms"]


def _share(stages: dict[str, dict[str, float]], *names: str) -> float:
    everything = sum(_total(v) for v in stages.values()) or 1.0
    return sum(_total(stages[n]) for n in names if n in stages) / everything


def _stage(stages: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    return stages.get(name, {"forward_ms": 0.0, "backward_ms": 0.0})


def _ratio_text(r: dict[str, Any] | None) -> str:
    return f"{r['median']:.2f}× [{r['min']:.2f}–{r['max']:.2f}]" if r else "n/a"


def _patch_rows(patch: dict[str, Any] | None) -> str:
    if not patch:
        return (
            "(Run `python -m benchmarks.speed` with `mona_unfused` among the methods for the whole-model comparison.)"
        )
    from benchmarks.report import provenance

    lines = []
    for c in patch["configs"]:
        tr, ir, mem = c["train_time_ratios"], c["inference_time_ratios"], c["train_peak_ratios"]
        inc = c["train_step_memory_ratios"] if c.get("heap", "trimmed") == "trimmed" else {}
        lines.append(
            f"- **{c['model_name']}, batch {c['batch']}** ({c['rounds']} rounds): train step fused / unfused "
            f"{_ratio_text(tr.get('mona/mona_unfused'))}, fused / LoRA {_ratio_text(tr.get('mona/lora'))} "
            f"(unfused / LoRA {_ratio_text(tr.get('mona_unfused/lora'))}); inference fused / frozen "
            f"{_ratio_text(ir.get('mona/frozen'))} (unfused {_ratio_text(ir.get('mona_unfused/frozen'))}); "
            f"peak RSS fused / LoRA {_ratio_text(mem.get('mona/lora'))} (unfused "
            f"{_ratio_text(mem.get('mona_unfused/lora'))}); step increment fused / LoRA "
            f"{_ratio_text(inc.get('mona/lora'))} (unfused {_ratio_text(inc.get('mona_unfused/lora'))}). "
            f"A/A: train {_ratio_text(tr.get('mona_twin/mona'))}, inference {_ratio_text(ir.get('mona_twin/mona'))}."
        )
    return "\n".join([*lines, "", provenance(patch)])


def render(profile: dict[str, Any], tables: dict[str, str], speed: dict[str, Any] | None,
           patch: dict[str, Any] | None, figure: str | None) -> str:  # fmt: skip
    """The whole of docs/profile.md (``{generated}`` marks where the generated-file notice goes)."""
    from benchmarks.report import provenance

    module, step, hooks = profile["module"], profile["train_step"]["median_ms"], profile["hooks"]
    train = module["train"]["stages"]
    fused_train = profile.get("module_fused", {}).get("train", {}).get("stages")
    forward_total = step.get("step: forward", 0.0) or 1.0
    backward_total = step.get("step: backward", 0.0) or 1.0
    step_total = sum(step.get(k, 0.0) for k in ("step: forward", "step: backward", "step: optimizer")) or 1.0
    compute_f, compute_b = step.get("mona compute: forward", 0.0), step.get("mona compute: backward", 0.0)
    glue_us = hooks["glue_us_per_block_call"]["median"]
    idle_us = hooks.get("idle_wrapper_us_per_block_call", {}).get("median")
    ops = profile.get("op_costs", {}).get("ms", {})
    vit_bound, swin_bound = profile.get("flops", {}).get("vit-b"), profile.get("flops", {}).get("swin-t")
    fused_vit = profile["fused_module"]["vit-b"]
    copies = module["train"].get("copy_parents", {})
    blocks = 12  # ViT-B/16

    def op(name: str) -> str:
        stat = ops.get(name)
        return f"{stat['median']:.1f} ms" if stat and stat.get("n") else "n/a"

    fused_text = fused_tables = bounds_text = ""
    if fused_train:
        plain_norm_down = _total(_stage(train, STAGE_NORM)) + _total(_stage(train, STAGE_DOWN))
        norm_down = _total(_stage(fused_train, STAGE_NORM_DOWN))
        fused_text = (
            f" In the default fused form the scaled norm and the down projection together take "
            f"{_share(fused_train, STAGE_NORM_DOWN):.0%} of the module ({norm_down:.0f}"
            f" ms against {plain_norm_down:.0f} ms as plain ops; the whole module "
            f"{sum(_total(v) for v in fused_train.values()):.0f} ms against "
            f"{sum(_total(v) for v in train.values()) or 1.0:.0f} ms in these profiled runs)."
        )
    if "stages_fused_train" in tables:
        fused_tables = (
            "Fused form (`fused=True`, the default), train (forward + backward):\n\n"
            f"{tables['stages_fused_train']}\n\nFused form, inference:\n\n{tables['stages_fused_inference']}\n\n"
        )
    if vit_bound:
        bounds_text += (
            f"ViT-B/16: Mona adds {vit_bound['mona_macs'] / vit_bound['backbone_block_macs']:.1%} to the blocks' "
            f"forward, so inference ≥ {vit_bound['bound_inference_mona_over_frozen']:.3f}× the frozen backbone and "
            f"a train step ≥ {vit_bound['bound_train_mona_over_lora']:.3f}× LoRA's "
            f"(≤ {vit_bound['bound_train_mona_over_full']:.2f}× full fine-tuning's). The targets (1.04, 1.05) leave "
            "about 1–2% of the step for everything else Mona does (norm, adds, GELU, dropout, conv, launches). "
        )
    if swin_bound:
        bounds_text += (
            f"Swin-T: ≥ {swin_bound['bound_train_mona_over_lora']:.2f}× LoRA and ≥ "
            f"{swin_bound['bound_inference_mona_over_frozen']:.2f}× frozen, because the paper's bottleneck m = 64 is "
            f"two thirds of stage 1's width C = 96 (Mona = {swin_bound['stages'][0]['mona_share_of_block']:.0%} of a "
            "stage-1 block's multiply-adds): those targets cannot hold on Swin-T by construction."
        )
    values = {
        "generated": "{generated}",
        "provenance": provenance(profile),
        "shape": module["shape"],
        "tokens": module["shape"]["prefix"] + module["shape"]["grid"] ** 2,
        "module": module,
        "wide_share": _share(train, STAGE_NORM, STAGE_DOWN, STAGE_UP),
        "norm_share": _share(train, STAGE_NORM),
        "norm": _stage(train, STAGE_NORM),
        "conv_share": _share(train, STAGE_CONV),
        "proj_share": _share(train, STAGE_PROJ),
        "gelu_share": _share(train, STAGE_GELU),
        "fused_text": fused_text,
        "grid": _stage(train, STAGE_GRID),
        "cat_ms": _total(_stage(train, STAGE_CAT)),
        "merge": _stage(train, STAGE_MERGE),
        "merge_ms": _total(_stage(train, STAGE_MERGE)),
        "copy_all": sum(_total(v) for v in copies.values()),
        "copy_addmm": sum(_total(v) for k, v in copies.items() if k == "aten::addmm"),
        "copy_conv": sum(_total(v) for k, v in copies.items() if "conv" in k),
        "step_info": profile["train_step"],
        "step_s": step_total / 1e3,
        "compute_f_s": compute_f / 1e3,
        "forward_s": forward_total / 1e3,
        "compute_f_share": compute_f / forward_total,
        "compute_b_s": compute_b / 1e3,
        "backward_s": backward_total / 1e3,
        "compute_b_share": compute_b / backward_total,
        "glue_f": step.get(GLUE_FORWARD, 0.0),
        "glue_b": step.get(GLUE_BACKWARD, 0.0),
        "blocks": blocks,
        "glue_us": glue_us,
        "glue_step_ms": blocks * glue_us / 1e3,
        "idle_text": (
            f" The wrapper with its adapters disabled (`with model.disable_adapter():`) costs {idle_us:.0f} µs per "
            "block over the plain model."
            if idle_us is not None
            else ""
        ),
        "block_ms": forward_total / blocks,
        "bounds_text": bounds_text,
        "saved": fused_vit["saved_for_backward_mib"],
        "figure_text": f"![stages of one Mona module]({figure})\n\n" if figure else "",
        "tables": tables,
        "fused_tables": fused_tables,
        "patch_rows": _patch_rows(patch),
        "op_var_mean": op("var_mean over C"),
        "op_layer_norm": op("layer_norm (with affine)"),
        "op_linear_128": op("linear C -> 128"),
        "op_linear_64": op("linear C -> 64 (down projection)"),
        "cached_ratio": _ratio_text(profile["filter_variants"]["ratios"].get("cached/src")),
        "vit": {
            f"{mode}_{variant}": _ratio_text(fused_vit[mode]["ratios"].get(f"{variant}/unfused"))
            for mode in ("train", "inference")
            for variant in ("fused", "unfused_twin")
        },
        "speed_text": "\n\nSpeed and memory of the current code next to LoRA and full fine-tuning: docs/benchmarks.md."
        if speed is not None
        else "",
    }
    return TEMPLATE.read_text().format(**values).rstrip() + "\n"
