"""The text of ``docs/profile.md``: findings of ``benchmarks/results/profile.json`` with their numbers filled in.

Called by :mod:`benchmarks.report`; the tables come from there, the sentences and their numbers from here, so a
rerun of the profile updates every figure in the prose as well.
"""

from __future__ import annotations

from typing import Any

# The stage labels of benchmarks/profile_mona.py (kept in sync by tests/test_benchmarks.py).
STAGE_NORM = "scaled norm: LN(x)*s1 + x*s2"
STAGE_DOWN = "down projection (C -> m)"
STAGE_NORM_DOWN = "scaled norm + down (fused function)"
STAGE_GRID = "to grid: split + transpose + reshape"
STAGE_MERGE = "merge the 3 kernels into one"
STAGE_CONV = "depthwise conv (merged 7x7)"
STAGE_CAT = "from grid + prefix-token cat"
STAGE_PROJ = "projector: 1x1 conv + skip, as (W + I)"
STAGE_GELU = "GELU + dropout"
STAGE_UP = "up projection (m -> C)"
GLUE_FORWARD = "mona glue (aten ops in mona_peft outside the adapters): forward"
GLUE_BACKWARD = "mona glue (aten ops in mona_peft outside the adapters): backward"


def _total(stage: dict[str, float]) -> float:
    return stage["forward_ms"] + stage["backward_ms"]


def _share(stages: dict[str, dict[str, float]], *names: str) -> float:
    everything = sum(_total(v) for v in stages.values()) or 1.0
    return sum(_total(stages[n]) for n in names if n in stages) / everything


def _stage(stages: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    return stages.get(name, {"forward_ms": 0.0, "backward_ms": 0.0})


def _ratio_text(r: dict[str, Any] | None) -> str:
    if not r:
        return "n/a"
    return f"{r['median']:.2f}× [{r['min']:.2f}–{r['max']:.2f}]"


def _provenance(payload: dict[str, Any]) -> str:
    from benchmarks.report import provenance

    return provenance(payload)


def _patch_rows(patch: dict[str, Any] | None) -> list[str]:
    if not patch:
        return [
            "(Run `python -m benchmarks.speed` with `mona_unfused` among the methods for the whole-model comparison.)"
        ]
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
    lines += ["", _provenance(patch)]
    return lines


def render(
    profile: dict[str, Any],
    tables: dict[str, str],
    speed: dict[str, Any] | None,
    patch: dict[str, Any] | None,
    figure: str | None,
) -> str:
    """The whole of docs/profile.md (``{generated}`` marks where the generated-file notice goes)."""
    module, step, hooks = profile["module"], profile["train_step"]["median_ms"], profile["hooks"]
    shape = module["shape"]
    train = module["train"]["stages"]
    fused_train = profile.get("module_fused", {}).get("train", {}).get("stages")
    wide = (STAGE_NORM, STAGE_DOWN, STAGE_UP)
    forward_total = step.get("step: forward", 0.0) or 1.0
    backward_total = step.get("step: backward", 0.0) or 1.0
    step_total = sum(step.get(k, 0.0) for k in ("step: forward", "step: backward", "step: optimizer")) or 1.0
    compute_f, compute_b = step.get("mona compute: forward", 0.0), step.get("mona compute: backward", 0.0)
    glue_f, glue_b = step.get(GLUE_FORWARD, 0.0), step.get(GLUE_BACKWARD, 0.0)
    glue_us = hooks["glue_us_per_block_call"]["median"]
    idle_us = hooks.get("idle_wrapper_us_per_block_call", {}).get("median")
    ops = profile.get("op_costs", {}).get("ms", {})
    flops = profile.get("flops", {})
    saved = profile["fused_module"]["vit-b"]["saved_for_backward_mib"]
    fused_vit = profile["fused_module"]["vit-b"]
    fv = profile["filter_variants"]["ratios"]
    copies = module["train"].get("copy_parents", {})
    copy_conv = sum(v["forward_ms"] + v["backward_ms"] for k, v in copies.items() if "conv" in k)
    copy_addmm = sum(v["forward_ms"] + v["backward_ms"] for k, v in copies.items() if k == "aten::addmm")
    copy_all = sum(v["forward_ms"] + v["backward_ms"] for v in copies.values())
    blocks = 12  # ViT-B/16
    block_ms = forward_total / blocks
    s = profile["train_step"]
    grid, cat, merge = _stage(train, STAGE_GRID), _stage(train, STAGE_CAT), _stage(train, STAGE_MERGE)

    def vit_ratios(mode: str, variant: str) -> dict[str, Any] | None:
        return fused_vit[mode]["ratios"].get(f"{variant}/unfused")

    def op(name: str) -> str:
        stat = ops.get(name)
        return f"{stat['median']:.1f} ms" if stat and stat.get("n") else "n/a"

    fused_text = ""
    if fused_train:
        fused_total = sum(_total(v) for v in fused_train.values())
        plain_total = sum(_total(v) for v in train.values()) or 1.0
        norm_down = _total(_stage(fused_train, STAGE_NORM_DOWN))
        plain_norm_down = _total(_stage(train, STAGE_NORM)) + _total(_stage(train, STAGE_DOWN))
        fused_text = (
            f" In the default fused form the scaled norm and the down projection together take "
            f"{_share(fused_train, STAGE_NORM_DOWN):.0%} of the module ({norm_down:.0f} ms against "
            f"{plain_norm_down:.0f} ms as plain ops; the whole module {fused_total:.0f} ms against "
            f"{plain_total:.0f} ms in these profiled runs)."
        )
    vit_bound, swin_bound = flops.get("vit-b"), flops.get("swin-t")
    idle_text = (
        f" The wrapper with its adapters disabled (`with model.disable_adapter():`) costs {idle_us:.0f} µs per block "
        "over the plain model."
        if idle_us is not None
        else ""
    )
    lines = [
        "# Where Mona's time goes",
        "",
        "{generated}",
        "",
        "`torch.profiler` on one Mona module (`mona_peft.MonaAdapter`) at ViT-B/16 shapes and on a full ViT-B/16 "
        "train step. The module computes in one of two forms, chosen by its `fused` flag (`mona_peft.set_compute`): "
        "the plain-op reference (`fused=False`), which the stage-by-stage profile below is mainly of because it is "
        "what motivated the fused form, and the default fused form (`src/mona_peft/fused.py`), profiled the same "
        "way and measured against it. Everything is measured through the package's public API: the stage profile "
        "runs the adapter's own sub-modules through a copy of its forward with one `record_function` per stage "
        "(checked bit-identical to `adapter(x, grid, num_prefix)`), the train step uses forward hooks on the "
        "adapters and the profiler's Python stacks; nothing in the package is patched. Rerun with "
        "`python -m benchmarks.profile_mona` and `python -m benchmarks.report`.",
        "",
        _provenance(profile),
        "",
        "## Findings",
        "",
        f"1. **Mona's cost is its full-width work, not the convolution.** In one module at x = [{shape['batch']}, "
        f"{shape['prefix'] + shape['grid'] ** 2}, {shape['hidden']}] (train: forward + backward, plain-op form), "
        "the three stages "
        f"that touch [B, N, C] tensors, i.e. the scaled norm `LN(x)·s1 + x·s2` and the down and up projections, take "
        f"**{_share(train, *wide):.0%}** of the time; the scaled norm alone {_share(train, STAGE_NORM):.0%} "
        f"({_stage(train, STAGE_NORM)['forward_ms']:.0f} ms forward, {_stage(train, STAGE_NORM)['backward_ms']:.0f} "
        "ms backward: its backward is four full-size multiplies, two reductions, LayerNorm's backward and the sums "
        f"into x's gradient). The merged depthwise conv is {_share(train, STAGE_CONV):.0%}, the projector "
        f"{_share(train, STAGE_PROJ):.0%}, GELU + dropout {_share(train, STAGE_GELU):.0%}." + fused_text,
        f"2. **The layout changes are free.** [B, N, m] → [B, m, H, W] is a split + transpose + reshape *view*: the "
        "conv receives a channels-last view and oneDNN runs it in that layout; the way back is a view too. The "
        f"`to grid` stage costs {grid['forward_ms']:.2f} ms forward and {grid['backward_ms']:.2f} ms backward (one "
        f"`cat` of the split's gradients), and the prefix-token `cat` {_total(cat):.1f} ms. All `copy_` calls "
        f"together take {copy_all:.1f} ms: {copy_addmm:.1f} ms is `addmm` copying its bias into the output, "
        f"{copy_conv:.1f} ms is the conv making the (non-dense) patch view dense. Merging the three kernels "
        f"costs {_total(merge):.2f} ms per call.",
        f"3. **In a whole train step** ({s['model']}, batch {s['batch']}, default fused form, median of "
        f"{s['iterations']} profiled steps, {step_total / 1e3:.1f} s under the profiler): Mona's own compute is "
        f"{compute_f / 1e3:.2f} s of the {forward_total / 1e3:.2f} s forward ({compute_f / forward_total:.0%}) and "
        f"{compute_b / 1e3:.2f} s of the {backward_total / 1e3:.2f} s backward ({compute_b / backward_total:.0%}); "
        "the glue around it, i.e. the aten ops `mona_peft` runs outside the adapters (the three residual adds per "
        f"block), {glue_f:.0f} ms forward + {glue_b:.0f} ms backward. The Python side of the hooks adds about "
        f"{blocks} × {glue_us:.0f} µs ≈ {blocks * glue_us / 1e3:.0f} ms (finding 4).",
        f"4. **The glue costs {glue_us:.0f} µs per block call** (median; a 12-block tiny ViT, one thread: the "
        "wrapped model's forward minus the plain model's and minus its 24 Mona modules called on their own with "
        "the inputs they got; per-forward costs of the PEFT wrapper are spread over the blocks, and the spread is "
        f"large at this scale).{idle_text} A ViT-B/16 block's forward takes {block_ms:.0f} ms at batch {s['batch']} "
        "here, so this is noise: not worth optimising.",
        "5. **What an ideal implementation could reach** (matmul and conv multiply-adds only, counted from the "
        "configs): "
        + (
            f"ViT-B/16: Mona adds {vit_bound['mona_macs'] / vit_bound['backbone_block_macs']:.1%} to the blocks' "
            f"forward, so inference ≥ {vit_bound['bound_inference_mona_over_frozen']:.3f}× the frozen backbone and "
            f"a train step ≥ {vit_bound['bound_train_mona_over_lora']:.3f}× LoRA's "
            f"(≤ {vit_bound['bound_train_mona_over_full']:.2f}× full fine-tuning's). The targets (1.04, 1.05) leave "
            "about 1–2% of the step for everything else Mona does (norm, adds, GELU, dropout, conv, launches). "
            if vit_bound
            else ""
        )
        + (
            f"Swin-T: ≥ {swin_bound['bound_train_mona_over_lora']:.2f}× LoRA and ≥ "
            f"{swin_bound['bound_inference_mona_over_frozen']:.2f}× frozen, because the paper's bottleneck m = 64 is "
            f"two thirds of stage 1's width C = 96 (Mona = {swin_bound['stages'][0]['mona_share_of_block']:.0%} of a "
            "stage-1 block's multiply-adds): those targets cannot hold on Swin-T by construction."
            if swin_bound
            else ""
        ),
        f"6. **Memory**: in the plain-op form autograd keeps {saved['unfused']:.1f} MiB per Mona module at "
        "these shapes: three [B, N, C] tensors (x, LN(x) for s1's gradient, the down projection's input) plus the "
        f"m-wide ones; the fused form keeps {saved['fused']:.1f} MiB. LoRA keeps almost nothing of its own, which "
        "is why the plain-op form's peak training memory is well above LoRA's (see docs/benchmarks.md).",
        "",
        "## One Mona module, stage by stage",
        "",
        f"Median over {module['iterations']} profiled iterations; backward time is charged to the stage whose "
        "forward op created the autograd node.",
        "",
    ]
    if figure:
        lines += [f"![stages of one Mona module]({figure})", ""]
    lines += [
        "Plain-op form (`fused=False`), train (forward + backward):",
        "",
        tables["stages_train"],
        "",
        "Plain-op form, inference (forward, `torch.inference_mode`):",
        "",
        tables["stages_inference"],
        "",
    ]
    if "stages_fused_train" in tables:
        lines += [
            "Fused form (`fused=True`, the default), train (forward + backward):",
            "",
            tables["stages_fused_train"],
            "",
            "Fused form, inference:",
            "",
            tables["stages_fused_inference"],
            "",
        ]
    lines += [
        "Top aten ops (self time), plain-op form, train:",
        "",
        tables["ops_train"],
        "",
        "## A full train step",
        "",
        tables["step"],
        "",
        "## Glue per block call",
        "",
        tables["hooks"],
        "",
        "## Optimisations",
        "",
        "In `src/` (`src/mona_peft/fused.py`, used by `MonaAdapter.forward` unless `fused=False`); exact up to "
        "float rounding, checked against the plain-op form of the same module in float64 for outputs, input and all "
        "16 parameter gradients, plus gradcheck of the autograd function and a bfloat16-autocast train step, in "
        "`tests/test_fused.py`:",
        "",
        "1. **Scaled norm + down projection as one autograd function** (`ScaledNormDown`). Forward: LayerNorm with "
        "s1 folded into its affine (two size-C multiplies instead of a [B, N, C] one), an in-place `addcmul` for "
        "`+ x·s2`, the matmul. Backward keeps only x (alive anyway as the residual stream) and the per-token "
        "mean and 1/std; the weight gradients come from one [2m, BN] × [BN, C] matmul against x and C × m work, "
        "the input gradient from LayerNorm's own backward kernel plus one `addcmul`. Saves two [B, N, C] "
        f"activations per Mona ({saved['unfused']:.1f} → {saved['fused']:.1f} MiB at these shapes) and replaces "
        "four full-size multiplies, two full-size reductions and an add in backward by one `addcmul`.",
        "2. **One `split` instead of two slices** for prefix and patch tokens (both forms): its backward is one "
        "`cat` instead of two zero-filled `slice_backward` buffers and their sum.",
        "3. **Projector skip folded into the 1×1 weight** (both forms): `z + Wz + b = (W + I)z + b`, one op less "
        "each way.",
        "",
        "Measured, one module, plain ops (`fused=False`) vs fused (interleaved rounds, median of per-call times; "
        "A/A = the plain-op form against itself):",
        "",
        tables["patch"],
        "",
        tables["saved"],
        "",
        "Whole model (`speed.py`: Mona next to method `mona_unfused`, the same model after "
        "`set_compute(model, fused=False)`):",
        "",
        *_patch_rows(patch),
        "",
        "Considered and not proposed:",
        "",
        "- *channels-last conv to avoid transposes*: already the case (finding 2).",
        f"- *folding LayerNorm into the down matmul* (mean and variance from the input, "
        f"`down(h) = rstd·(x·A1ᵀ − μ·a1) + x·A2ᵀ + b'`): exact, and it would also drop the LayerNorm pass, but "
        f"`torch.var_mean` over C is slow on CPU ({op('var_mean over C')} vs {op('layer_norm (with affine)')} for "
        f"a whole LayerNorm on one [32, 197, 768] tensor) and the matmul doubles to 2m outputs "
        f"({op('linear C -> 128')} vs {op('linear C -> 64 (down projection)')}); the E[x²] − μ² shortcut loses "
        "precision when |mean| ≫ std. `ScaledNormDown` gets the memory saving without either cost.",
        "- *avoiding the prefix-token `cat`*: it copies an m-wide tensor "
        f"({_total(cat):.1f} ms with the unflatten, forward + backward); every alternative (padding, "
        "writing into a preallocated buffer) copies as much. The split (item 2) removes the expensive part, which "
        "was on the backward side.",
        "- *hooks/context variables*: a few µs per block (finding 4).",
        "- *caching the merged kernel in eval mode*: the filter alone in eval runs in "
        f"{_ratio_text(fv.get('cached/src'))} of the time with a precomputed kernel, but the merge is "
        f"{merge['forward_ms']:.2f} ms of a module's forward. A cache keyed on the parameters' version "
        "counters goes stale when weights are updated through `.data` (its own version counter): with it, the "
        "project's `test_resumed_run_matches_uninterrupted_run` evaluated bit-identical weights to a different "
        "loss. Not worth the risk.",
        "- *second-order gradients*: the fused function's backward is not itself differentiable "
        "(`once_differentiable`), so double backward through Mona (e.g. gradient penalties) raises an error; no "
        "Mona recipe uses it.",
        "",
        "Module timings of the fused form at the ViT-B/16 shape above: "
        f"train {_ratio_text(vit_ratios('train', 'fused'))}, "
        f"inference {_ratio_text(vit_ratios('inference', 'fused'))} of the plain-op one (A/A "
        f"{_ratio_text(vit_ratios('train', 'unfused_twin'))} and "
        f"{_ratio_text(vit_ratios('inference', 'unfused_twin'))}).",
    ]
    if speed is not None:
        lines += ["", "Speed and memory of the current code next to LoRA and full fine-tuning: docs/benchmarks.md."]
    return "\n".join(lines).rstrip() + "\n"
