"""Where Mona's time goes: torch.profiler on one Mona module at ViT-B/16 shapes and on a full ViT-B/16 train step.

1. **One module** (``mona_delta`` at [32, 197, 768], 14x14 grid, bottleneck 64): a copy of the plain-op version
   (:mod:`benchmarks.unfused`, the code this profile was made for, before the fused norm + down projection) with a
   ``record_function`` per stage (checked to give bit-identical results) splits the forward by stage; every
   backward node is charged to the stage whose forward op created it (autograd sequence numbers). Each iteration is
   profiled on its own; tables show the median over iterations.
2. **Module, unfused (before) vs fused (``src``)**, interleaved rounds with an A/A pair.
3. **A full train step** (ViT-B/16, batch 8, Mona, AdamW): forward / backward / optimizer, and Mona's share of each
   (its compute inside ``mona_delta``, and the glue: hooks, context variables and the residual adds).
4. **Hook and context-variable overhead** per block call, with Mona's compute stubbed out, on a tiny model.

    python -m benchmarks.profile_mona           # ~5 minutes on 2 cores
    python -m benchmarks.profile_mona --quick   # small shapes (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

import mona_peft
from benchmarks import unfused
from benchmarks.common import HEAD, MODELS, build_classifier, load_average, machine_info, mona_config, write_results
from benchmarks.speed import describe, median_ms, paired_ratios
from mona_peft.families import layout_for
from mona_peft.filters import merged_filter, reference_filter
from mona_peft.layer import MonaLayer, conv_part

BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
STAGES = (
    "scaled norm: LN(x)*s1 + x*s2",
    "down projection (C -> m)",
    "to grid: slice + transpose + reshape",
    "merge the 3 kernels into one",
    "depthwise conv (merged 7x7)",
    "from grid + prefix-token cat",
    "projector: 1x1 conv + skip",
    "GELU + dropout",
    "up projection (m -> C)",
)


# ------------------------------------------------------------------------------------- the module, stage by stage


def staged_mona_delta(
    layer: MonaLayer, adapter_name: str, position: str, x: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """:func:`benchmarks.unfused.unfused_mona_delta` (float32 path), one ``record_function`` per stage; the same ops
    in the same order."""
    settings = layer.mona_settings[adapter_name]
    p = layer._parts(adapter_name, position)
    batch, tokens, _ = x.shape
    height, width = grid
    num_prefix = tokens - height * width
    stage = iter(STAGES)
    with record_function(next(stage)):
        norm = p["norm"]
        h = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = h * p["scale_norm"] + x * p["scale_skip"]
    with record_function(next(stage)):
        h = F.linear(h, p["down"].weight, p["down"].bias)
    with record_function(next(stage)):
        patches = h[:, num_prefix:]
        image = patches.transpose(1, 2).reshape(batch, -1, height, width)
    convs = [p[conv_part(k)] for k in settings.kernel_sizes]
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    with record_function(next(stage)):
        from mona_peft.filters import merged_filter_params

        kernel, bias = merged_filter_params(weights, biases) if settings.merge_filters else (None, None)
    with record_function(next(stage)):
        if settings.merge_filters:
            image = F.conv2d(image, kernel, bias, padding=kernel.shape[-1] // 2, groups=image.shape[1])
        else:
            image = reference_filter(image, weights, biases)
    with record_function(next(stage)):
        patches = image.flatten(2).transpose(1, 2)
        h = torch.cat([h[:, :num_prefix], patches], dim=1) if num_prefix else patches
    with record_function(next(stage)):
        proj = p["proj"]
        h = h + F.linear(h, proj.weight.flatten(1), proj.bias)
    with record_function(next(stage)):
        h = F.dropout(F.gelu(h), settings.dropout, layer.training)
    with record_function(next(stage)):
        delta = F.linear(h, p["up"].weight, p["up"].bias)
    return delta


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _in_backward(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(BACKWARD_PREFIX):
            return True
        parent = parent.cpu_parent
    return False


def _ms(microseconds: float) -> float:
    return microseconds / 1e3


def attribute(events: list[Any], labels: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Forward time of each ``record_function`` label, and backward time of the autograd nodes its ops created."""
    out = {label: {"forward_ms": 0.0, "backward_ms": 0.0} for label in labels}
    owner: dict[int, str] = {}
    for e in events:
        if e.name in out:
            out[e.name]["forward_ms"] += _ms(e.cpu_time_total)
            for d in _descendants(e):
                if d.sequence_nr >= 0:
                    owner[d.sequence_nr] = e.name
    other = 0.0
    for e in events:
        if e.name.startswith(BACKWARD_PREFIX) and (e.cpu_parent is None or not _in_backward(e)):
            label = owner.get(e.sequence_nr)
            if label is None:
                other += _ms(e.cpu_time_total)
            else:
                out[label]["backward_ms"] += _ms(e.cpu_time_total)
    out["(backward, not linked: grad accumulation, ...)"] = {"forward_ms": 0.0, "backward_ms": other}
    return out


def op_table(events: list[Any]) -> dict[str, dict[str, float]]:
    """Self CPU time per aten op, split into forward and backward."""
    table: dict[str, dict[str, float]] = {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        row = table.setdefault(e.name, {"forward_ms": 0.0, "backward_ms": 0.0, "calls": 0})
        row["backward_ms" if _in_backward(e) else "forward_ms"] += _ms(e.self_cpu_time_total)
        row["calls"] += 1
    return table


def copy_parents(events: list[Any]) -> dict[str, dict[str, float]]:
    """Self time of ``aten::copy_`` by the op that called it (where layout conversions and casts happen)."""
    table: dict[str, dict[str, float]] = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name in ("aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to"):
            parent = parent.cpu_parent
        name = parent.name if parent is not None else "(top level)"
        row = table.setdefault(name, {"forward_ms": 0.0, "backward_ms": 0.0})
        row["backward_ms" if _in_backward(e) else "forward_ms"] += _ms(e.self_cpu_time_total)
    return table


def _median_tables(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    keys = dict.fromkeys(k for t in tables for k in t)
    return {
        k: {f: statistics.median(t.get(k, {}).get(f, 0.0) for t in tables) for f in ("forward_ms", "backward_ms")}
        for k in keys
    }


def make_module(hidden: int, bottleneck: int, merge_filters: bool = True, seed: int = 0) -> MonaLayer:
    """A MonaLayer around one ViT block (hidden size ``hidden``), with non-trivial adapter weights."""
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    block = ViTLayer(ViTConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden))
    config = mona_peft.MonaConfig(bottleneck_dim=bottleneck, init_weights=False, merge_filters=merge_filters)
    return MonaLayer(block, "default", config, layout_for(block))


def module_breakdown(shape: dict[str, int], iterations: int, seed: int) -> dict[str, Any]:
    """Per-stage and per-op breakdown of one Mona module (train: forward + backward; inference: forward)."""
    layer = make_module(shape["hidden"], shape["bottleneck"], seed=seed)
    grid = (shape["grid"], shape["grid"])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape["batch"], shape["prefix"] + grid[0] * grid[1], shape["hidden"], generator=generator)
    grad = torch.randn(x.shape, generator=generator)

    # the instrumented copy must compute exactly what the real method computes
    layer.eval()
    with torch.no_grad():
        if not torch.equal(
            staged_mona_delta(layer, "default", "attention", x, grid),
            unfused.unfused_mona_delta(layer, "default", "attention", x, grid),
        ):
            raise AssertionError("staged_mona_delta differs from unfused_mona_delta; update the copy")

    result: dict[str, Any] = {}
    for mode in ("train", "inference"):
        layer.train(mode == "train")

        def run(mode: str = mode) -> None:
            if mode == "train":
                xi = x.detach().requires_grad_(True)
                staged_mona_delta(layer, "default", "attention", xi, grid).backward(grad)
                layer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    staged_mona_delta(layer, "default", "attention", x, grid)

        for _ in range(2):
            run()
        stages, ops, copies, totals = [], [], [], []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                totals.append((time.perf_counter() - start) * 1e3)
            events = list(prof.events())
            stages.append(attribute(events, STAGES))
            ops.append(op_table(events))
            copies.append(copy_parents(events))
        op_median = _median_tables(ops)
        top = sorted(op_median.items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"]))[:14]
        result[mode] = {
            "total_ms": describe(totals),
            "stages": _median_tables(stages),
            "top_ops": dict(top),
            "copy_parents": _median_tables(copies),
        }
    return result


# ------------------------------------------------------------------------------------------- unfused vs fused


def module_comparison(shape: dict[str, int], rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Interleaved timing of ``mona_delta``: the unfused version, its A/A twin, and ``src``'s fused one."""
    layer = make_module(shape["hidden"], shape["bottleneck"], seed=seed)
    grid = (shape["grid"], shape["grid"])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape["batch"], shape["prefix"] + grid[0] * grid[1], shape["hidden"], generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    variants: dict[str, Callable[..., torch.Tensor]] = {
        "unfused": unfused.unfused_mona_delta,
        "unfused_twin": unfused.unfused_mona_delta,
        "fused": unfused.fused_mona_delta,
    }
    rng = random.Random(seed)
    result: dict[str, Any] = {"shape": shape, "rounds": rounds, "calls_per_measurement": inner}
    for mode in ("train", "inference"):
        layer.train(mode == "train")

        def run(fn: Callable[..., torch.Tensor], mode: str = mode) -> None:
            if mode == "train":
                xi = x.detach().requires_grad_(True)
                fn(layer, "default", "attention", xi, grid).backward(grad)
                layer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    fn(layer, "default", "attention", x, grid)

        for fn in variants.values():
            run(fn)
        records = []
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                records.append(
                    {"round": r, "method": name, "ms": median_ms(lambda name=name: run(variants[name]), inner)}
                )
        result[mode] = {
            "ms": {name: describe([rec["ms"] for rec in records if rec["method"] == name]) for name in variants},
            "ratios": {
                "fused/unfused": paired_ratios(records, "fused", "unfused", "ms"),
                "unfused_twin/unfused": paired_ratios(records, "unfused_twin", "unfused", "ms"),
            },
        }
    result["saved_for_backward_mib"] = {
        name: saved_tensor_mib(lambda fn=fn: fn(layer, "default", "attention", x.detach().requires_grad_(True), grid))
        for name, fn in (("unfused", unfused.unfused_mona_delta), ("fused", unfused.fused_mona_delta))
    }
    return result


def saved_tensor_mib(run: Callable[[], torch.Tensor]) -> float:
    """MiB of distinct storages autograd keeps for backward during ``run()`` (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values()) / 2**20


def filter_variants(shape: dict[str, int], rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """The filter alone in eval (no grad): merged as in src (kernel merged every call) vs merged with a cached kernel
    vs three convs, to size the kernel-cache idea."""
    torch.manual_seed(seed)
    b, m, g = shape["batch"], shape["bottleneck"], shape["grid"]
    image = torch.randn(b, 1 + g * g, m)[:, 1:].transpose(1, 2).reshape(b, m, g, g)
    convs = [torch.nn.Conv2d(m, m, k, padding=k // 2, groups=m) for k in (3, 5, 7)]
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    from mona_peft.filters import merged_filter_params

    with torch.no_grad():
        kernel, bias = merged_filter_params(weights, biases)

    variants = {
        "merged (src)": lambda: merged_filter(image, weights, biases),
        "merged, cached kernel": lambda: F.conv2d(image, kernel, bias, padding=3, groups=m),
        "three convs (reference)": lambda: reference_filter(image, weights, biases),
    }
    rng = random.Random(seed)
    records = []
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                records.append({"round": r, "method": name, "ms": median_ms(variants[name], inner)})
    return {
        "shape": shape,
        "ms": {name: describe([rec["ms"] for rec in records if rec["method"] == name]) for name in variants},
        "ratios": {
            "cached/src": paired_ratios(records, "merged, cached kernel", "merged (src)", "ms"),
            "reference/src": paired_ratios(records, "three convs (reference)", "merged (src)", "ms"),
        },
    }


# ---------------------------------------------------------------------------------------------- a full train step


@contextlib.contextmanager
def labelled_mona() -> Iterator[None]:
    """Wrap Mona's compute and its hooks in ``record_function`` ranges (build the model inside the ``with``)."""
    originals = {
        name: getattr(MonaLayer, name) for name in ("mona_delta", "_entry_hook", "_join_hook", "_output_hook")
    }

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        label = "mona: compute" if name == "mona_delta" else "mona: hook"

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(label):
                return fn(*args, **kwargs)

        return wrapped

    for name, fn in originals.items():
        setattr(MonaLayer, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(MonaLayer, name, fn)


def train_step_breakdown(model_key: str, batch: int, iterations: int, seed: int) -> dict[str, Any]:
    """Profile a Mona train step: forward, backward, optimizer; Mona's compute and glue within them."""
    spec = MODELS[model_key]
    torch.manual_seed(seed)
    with labelled_mona():
        model = get_peft_model(build_classifier(spec), mona_config(modules_to_save=[HEAD])).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=generator)
        labels = torch.randint(0, 1000, (batch,), generator=generator)

        def step() -> None:
            with record_function("step: forward"):
                loss = F.cross_entropy(model(pixel_values=pixels).logits, labels)
            with record_function("step: backward"):
                loss.backward()
            with record_function("step: optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step()
        rows = []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                step()
                wall = (time.perf_counter() - start) * 1e3
            events = list(prof.events())
            row = {"wall_ms": wall}
            for e in events:
                if e.name.startswith("step: "):
                    row[e.name] = _ms(e.cpu_time_total)
            mona = attribute(events, ("mona: compute", "mona: hook"))
            compute, hook = mona["mona: compute"], mona["mona: hook"]
            # hook ranges contain the compute ranges: the glue is what is left
            row["mona compute: forward"] = compute["forward_ms"]
            row["mona compute: backward"] = compute["backward_ms"]
            row["mona glue (hooks, contextvars, residual adds): forward"] = hook["forward_ms"] - compute["forward_ms"]
            row["mona glue (hooks, contextvars, residual adds): backward"] = hook["backward_ms"]
            rows.append(row)
    keys = dict.fromkeys(k for r in rows for k in r)
    return {
        "model": spec.name,
        "batch": batch,
        "iterations": iterations,
        "median_ms": {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys},
    }


# ------------------------------------------------------------------------------------------- arithmetic and ops


def flop_bounds(model_key: str, bottleneck: int = 64, lora_rank: int = 16) -> dict[str, Any]:
    """Multiply-adds per image of the backbone's blocks, of Mona and of LoRA r=16 q/v, and the ratios they imply.

    Counts the matmuls and convs only (what no implementation can avoid); elementwise work, norms and attention
    softmax are left out. Training: the frozen backbone runs forward + input gradients (2x forward), the adapters
    forward + input and weight gradients (3x), full fine-tuning 3x the backbone.
    """
    config = MODELS[model_key].config()
    if MODELS[model_key].family == "swin":
        side = config.image_size // config.patch_size
        stages = []
        for i, depth in enumerate(config.depths):
            width, grid = config.embed_dim * 2**i, side // 2**i
            stages.append((width, grid * grid, depth, config.window_size**2))
    else:
        grid = config.image_size // config.patch_size
        tokens = grid * grid + 1
        stages = [(config.hidden_size, tokens, config.num_hidden_layers, tokens)]
    backbone = mona = lora = 0
    per_stage = []
    for width, tokens, depth, attended in stages:
        block = 12 * width * width + 2 * attended * width  # q, k, v, o + 4x MLP; scores and weighted sum
        adapter = 2 * (2 * width * bottleneck + bottleneck * bottleneck + 49 * bottleneck)  # two Monas, merged 7x7
        low_rank = 2 * 2 * width * lora_rank  # A and B on q and v
        backbone += tokens * depth * block
        mona += tokens * depth * adapter
        lora += tokens * depth * low_rank
        per_stage.append({"width": width, "tokens": tokens, "blocks": depth, "mona_share_of_block": adapter / block})
    return {
        "model": MODELS[model_key].name,
        "backbone_block_macs": backbone,
        "mona_macs": mona,
        "lora_macs": lora,
        "stages": per_stage,
        "bound_inference_mona_over_frozen": (backbone + mona) / backbone,
        "bound_train_mona_over_lora": (2 * backbone + 3 * mona) / (2 * backbone + 3 * lora),
        "bound_train_mona_over_full": (2 * backbone + 3 * mona) / (3 * backbone),
    }


def op_costs(rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """A few ops on one [32, 197, 768] activation (ViT-B/16, batch 32): what a full-width pass costs here."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 197, 768, generator=generator)
    gamma, beta = torch.randn(768, generator=generator), torch.randn(768, generator=generator)
    down, down2 = torch.randn(64, 768, generator=generator), torch.randn(128, 768, generator=generator)
    ops = {
        "x * s (broadcast multiply)": lambda: x * gamma,
        "addcmul(x, x, s)": lambda: torch.addcmul(x, x, gamma),
        "layer_norm (with affine)": lambda: F.layer_norm(x, (768,), gamma, beta),
        "var_mean over C": lambda: torch.var_mean(x, -1, keepdim=True, correction=0),
        "linear C -> 64 (down projection)": lambda: F.linear(x, down),
        "linear C -> 128": lambda: F.linear(x, down2),
    }
    rng = random.Random(seed)
    records = []
    with torch.no_grad():
        for fn in ops.values():
            fn()
        for r in range(rounds):
            order = list(ops)
            rng.shuffle(order)
            for name in order:
                records.append({"round": r, "method": name, "ms": median_ms(ops[name], inner)})
    return {
        "shape": [32, 197, 768],
        "ms": {name: describe([rec["ms"] for rec in records if rec["method"] == name]) for name in ops},
    }


# ------------------------------------------------------------------------------------------------- hook overhead


def hook_overhead(rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Cost of Mona's glue per block call: a 12-block tiny ViT, plain vs wrapped with Mona's compute stubbed out."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    plain = ViTForImageClassification(config).eval()
    wrapped = get_peft_model(ViTForImageClassification(config), mona_config(bottleneck_dim=8)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    original = MonaLayer._position_delta

    def stubbed(self: MonaLayer, call: Any, position: str, x: torch.Tensor) -> None:
        return None

    def run(model: Any, stub: bool) -> None:
        MonaLayer._position_delta = stubbed if stub else original
        try:
            with torch.no_grad():
                model(pixel_values=pixels)
        finally:
            MonaLayer._position_delta = original

    variants = {"plain": (plain, False), "mona glue only": (wrapped, True), "mona": (wrapped, False)}
    rng = random.Random(seed)
    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microsecond-scale work: keep OpenMP barriers (and other processes) out of it
    for model, stub in variants.values():
        run(model, stub)
    for r in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                run(*variants[name])
            records.append({"round": r, "method": name, "us": (time.perf_counter() - start) / inner * 1e6})
    torch.set_num_threads(threads)
    per_block = []
    by_round: dict[int, dict[str, float]] = {}
    for x in records:
        by_round.setdefault(x["round"], {})[x["method"]] = x["us"]
    for row in by_round.values():
        per_block.append((row["mona glue only"] - row["plain"]) / config.num_hidden_layers)
    return {
        "model": "tiny ViT, 12 blocks, hidden 32, 17 tokens, batch 1, no grad, 1 thread",
        "us_per_forward": {
            name: describe([rec["us"] for rec in records if rec["method"] == name]) for name in variants
        },
        "glue_us_per_block_call": describe(per_block),
    }


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default profile, or profile_quick)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.quick:
        shape = dict(batch=2, prefix=1, grid=4, hidden=32, bottleneck=8)
        swin_shape = dict(batch=2, prefix=0, grid=8, hidden=16, bottleneck=8)
        iters, rounds, inner, step_model, step_batch, step_iters = 2, 3, 2, "tiny-vit", 2, 1
    else:
        shape = dict(batch=32, prefix=1, grid=14, hidden=768, bottleneck=64)
        swin_shape = dict(batch=32, prefix=0, grid=56, hidden=96, bottleneck=64)
        iters, rounds, inner, step_model, step_batch, step_iters = 7, 11, 3, "vit-b", 8, 3
    payload: dict[str, Any] = {"benchmark": "profile", "quick": args.quick, "machine": machine_info()}
    print("module breakdown ...", flush=True)
    payload["module"] = {"shape": shape, "iterations": iters, **module_breakdown(shape, iters, args.seed)}
    print("unfused vs fused ...", flush=True)
    payload["fused_module"] = {
        "vit-b": module_comparison(shape, rounds, inner, args.seed),
        "swin-t stage 1": module_comparison(swin_shape, rounds, inner, args.seed),
    }
    payload["filter_variants"] = filter_variants(shape, rounds, inner * 3, args.seed)
    payload["op_costs"] = op_costs(max(3, rounds // 2), inner * 2, args.seed)
    payload["flops"] = {key: flop_bounds(key) for key in ("vit-b", "swin-t")}
    print("train step ...", flush=True)
    payload["train_step"] = train_step_breakdown(step_model, step_batch, step_iters, args.seed)
    print("hook overhead ...", flush=True)
    payload["hooks"] = hook_overhead(rounds * 2, inner * 10, args.seed)
    payload["load_average_at_end"] = load_average()
    payload["seconds"] = round(time.perf_counter() - started, 1)
    path = write_results(args.name or ("profile_quick" if args.quick else "profile"), payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
