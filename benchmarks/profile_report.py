"""The text of ``docs/profile.md``: findings of ``benchmarks/results/profile.json`` with their numbers filled in.

Called by :mod:`benchmarks.report`; the tables come from there, the sentences and their numbers from here, so a
rerun of the profile updates every figure in the prose as well.
"""

from __future__ import annotations

from typing import Any

STAGE_NORM = "scaled norm: LN(x)*s1 + x*s2"
STAGE_DOWN = "down projection (C -> m)"
STAGE_GRID = "to grid: slice + transpose + reshape"
STAGE_MERGE = "merge the 3 kernels into one"
STAGE_CONV = "depthwise conv (merged 7x7)"
STAGE_CAT = "from grid + prefix-token cat"
STAGE_PROJ = "projector: 1x1 conv + skip"
STAGE_GELU = "GELU + dropout"
STAGE_UP = "up projection (m -> C)"


def _total(stage: dict[str, float]) -> float:
    return stage["forward_ms"] + stage["backward_ms"]


def _share(stages: dict[str, dict[str, float]], *names: str) -> float:
    everything = sum(_total(v) for v in stages.values()) or 1.0
    return sum(_total(stages[n]) for n in names) / everything


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
            "(Run `python -m benchmarks.speed` with `mona_unfused` among the methods for the whole-model "
            "before/after.)"
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
    wide = (STAGE_NORM, STAGE_DOWN, STAGE_UP)
    forward_total = step.get("step: forward", 0.0) or 1.0
    backward_total = step.get("step: backward", 0.0) or 1.0
    step_total = sum(step.get(k, 0.0) for k in ("step: forward", "step: backward", "step: optimizer")) or 1.0
    compute_f, compute_b = step.get("mona compute: forward", 0.0), step.get("mona compute: backward", 0.0)
    glue_f = step.get("mona glue (hooks, contextvars, residual adds): forward", 0.0)
    glue_b = step.get("mona glue (hooks, contextvars, residual adds): backward", 0.0)
    glue_us = hooks["glue_us_per_block_call"]["median"]
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

    def vit_ratios(mode: str, variant: str) -> dict[str, Any] | None:
        return fused_vit[mode]["ratios"].get(f"{variant}/unfused")

    def op(name: str) -> str:
        stat = ops.get(name)
        return f"{stat['median']:.1f} ms" if stat and stat.get("n") else "n/a"

    vit_bound, swin_bound = flops.get("vit-b"), flops.get("swin-t")
    lines = [
        "# Where Mona's time goes",
        "",
        "{generated}",
        "",
        "`torch.profiler` on one Mona module at ViT-B/16 shapes and on a full ViT-B/16 train step, then the "
        "optimisation this led to, now in `src/` (`src/mona_peft/fused.py`), measured against the earlier "
        "plain-op code, which `benchmarks/unfused.py` keeps for that purpose. The stage-by-stage profile below is of "
        "that earlier code: it is what motivated the change. Rerun with `python -m benchmarks.profile_mona` and "
        "`python -m benchmarks.report`.",
        "",
        _provenance(profile),
        "",
        "## Findings",
        "",
        f"1. **Mona's cost is its full-width work, not the convolution.** In one module at x = [{shape['batch']}, "
        f"{shape['prefix'] + shape['grid'] ** 2}, {shape['hidden']}] (train: forward + backward), the three stages "
        f"that touch [B, N, C] tensors, i.e. the scaled norm `LN(x)·s1 + x·s2` and the down and up projections, take "
        f"**{_share(train, *wide):.0%}** of the time; the scaled norm alone {_share(train, STAGE_NORM):.0%} "
        f"({train[STAGE_NORM]['forward_ms']:.0f} ms forward, {train[STAGE_NORM]['backward_ms']:.0f} ms backward: "
        "its backward is four full-size multiplies, two reductions, LayerNorm's backward and the sums into x's "
        f"gradient). The merged depthwise conv is {_share(train, STAGE_CONV):.0%}, the projector "
        f"{_share(train, STAGE_PROJ):.0%}, GELU + dropout {_share(train, STAGE_GELU):.0%}.",
        f"2. **The layout changes are free.** [B, N, m] → [B, m, H, W] is a transpose + reshape *view*: the conv "
        "receives a channels-last view and oneDNN runs it in that layout; the way back is a view too. The "
        f"`to grid` stage costs {train[STAGE_GRID]['forward_ms']:.2f} ms forward; its backward "
        f"({train[STAGE_GRID]['backward_ms']:.1f} ms) is the zero-filled buffers of the two `h[:, a:b]` slices "
        f"(`slice_backward`), and the prefix-token `cat` costs {_total(train[STAGE_CAT]):.1f} ms. All `copy_` calls "
        f"together take {copy_all:.1f} ms: {copy_addmm:.1f} ms is `addmm` copying its bias into the output, "
        f"{copy_conv:.1f} ms is the conv making the sliced (non-dense) patch view dense. Merging the three kernels "
        "costs "
        f"{_total(train[STAGE_MERGE]):.2f} ms per call.",
        f"3. **In a whole train step** ({s['model']}, batch {s['batch']}, median of {s['iterations']} profiled "
        f"steps, {step_total / 1e3:.1f} s): Mona's own compute is {compute_f / 1e3:.2f} s of the "
        f"{forward_total / 1e3:.2f} s forward ({compute_f / forward_total:.0%}) and {compute_b / 1e3:.2f} s of the "
        f"{backward_total / 1e3:.2f} s backward ({compute_b / backward_total:.0%}); the glue around it (hooks, "
        f"context variables and the three residual adds per block) {glue_f:.0f} ms forward + {glue_b:.0f} ms "
        f"backward, of which the hooks themselves are about {blocks} × {glue_us:.0f} µs ≈ "
        f"{blocks * glue_us / 1e3:.0f} ms (finding 4): the rest is the full-width adds.",
        f"4. **Hooks and context variables cost {glue_us:.0f} µs per block call** (median; a 12-block tiny ViT with "
        "Mona's compute stubbed out, against the plain model, one thread; the spread is large at this scale). A "
        f"ViT-B/16 block's forward takes {block_ms:.0f} ms at batch {s['batch']} here, so this is noise: not worth "
        "optimising.",
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
        f"6. **Memory**: in the plain-op version autograd keeps {saved['unfused']:.1f} MiB per Mona module at "
        "these shapes: three [B, N, C] tensors (x, LN(x) for s1's gradient, the down projection's input) plus the "
        "m-wide ones. LoRA keeps almost nothing of its own, which is why that version's peak training memory was "
        "well above LoRA's (see docs/benchmarks.md).",
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
        "Train (forward + backward):",
        "",
        tables["stages_train"],
        "",
        "Inference (forward, `torch.inference_mode`):",
        "",
        tables["stages_inference"],
        "",
        "Top aten ops (self time), train:",
        "",
        tables["ops_train"],
        "",
        "## A full train step",
        "",
        tables["step"],
        "",
        "## Hooks and context variables",
        "",
        tables["hooks"],
        "",
        "## Optimisations",
        "",
        "Applied in `src/` (`src/mona_peft/fused.py` and `MonaLayer.mona_delta`); exact up to float rounding, "
        "checked against the plain-op version in float64 for outputs, input and all 16 parameter gradients, plus "
        "gradcheck of the new autograd function and a bfloat16-autocast train step, in `tests/test_fused.py`; the "
        "project's torch.compile and gradient-checkpointing tests run on it:",
        "",
        "1. **Scaled norm + down projection as one autograd function** (`ScaledNormDown`). Forward: LayerNorm with "
        "s1 folded into its affine (two size-C multiplies instead of a [B, N, C] one), an in-place `addcmul` for "
        "`+ x·s2`, the matmul. Backward keeps only x (alive anyway as the residual stream) and the per-token "
        "mean and 1/std; the weight gradients come from one [2m, BN] × [BN, C] matmul against x and C × m work, "
        "the input gradient from LayerNorm's own backward kernel plus one `addcmul`. Saves two [B, N, C] "
        f"activations per Mona ({saved['unfused']:.1f} → {saved['fused']:.1f} MiB at these shapes) and replaces "
        "four full-size multiplies, two full-size reductions and an add in backward by one `addcmul`.",
        "2. **One `split` instead of two slices** for prefix and patch tokens: its backward is one `cat` instead of "
        "two zero-filled `slice_backward` buffers and their sum.",
        "3. **Projector skip folded into the 1×1 weight**: `z + Wz + b = (W + I)z + b`, one op less each way.",
        "",
        "Measured, one module, unfused vs fused (interleaved rounds, median of per-call times; A/A = the "
        "unfused version against itself):",
        "",
        tables["patch"],
        "",
        tables["saved"],
        "",
        "Whole model (`speed.py`, Mona next to the earlier version as method `mona_unfused`):",
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
        f"({_total(train[STAGE_CAT]):.1f} ms with the unflatten, forward + backward); every alternative (padding, "
        "writing into a preallocated buffer) copies as much. The split (item 2) removes the expensive part, which "
        "was on the backward side.",
        "- *hooks/context variables*: a few µs per block (finding 4).",
        "- *caching the merged kernel in eval mode*: the filter alone in eval runs in "
        f"{_ratio_text(fv.get('cached/src'))} of the time with a precomputed kernel, but the merge is "
        f"{train[STAGE_MERGE]['forward_ms']:.2f} ms of a module's forward. A cache keyed on the parameters' version "
        "counters goes stale when weights are updated through `.data` (its own version counter): with it, the "
        "project's `test_resumed_run_matches_uninterrupted_run` evaluated bit-identical weights to a different "
        "loss. Not worth the risk.",
        "- *second-order gradients*: the fused function's backward is not itself differentiable "
        "(`once_differentiable`), so double backward through Mona (e.g. gradient penalties) raises an error; no "
        "Mona recipe uses it.",
        "",
        "Module timings of the fused version at the ViT-B/16 shape above: "
        f"train {_ratio_text(vit_ratios('train', 'fused'))}, "
        f"inference {_ratio_text(vit_ratios('inference', 'fused'))} of the unfused one (A/A "
        f"{_ratio_text(vit_ratios('train', 'unfused_twin'))} and "
        f"{_ratio_text(vit_ratios('inference', 'unfused_twin'))}).",
    ]
    if speed is not None:
        lines += ["", "Speed and memory of the current code next to LoRA and full fine-tuning: docs/benchmarks.md."]
    return "\n".join(lines).rstrip() + "\n"
