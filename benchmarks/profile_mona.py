"""Where Mona's time goes: torch.profiler on one Mona module at ViT-B/16 shapes and on a ViT-B/16 train step, through
the public API only (``MonaAdapter`` and its ``fused`` / ``merge_filters`` flags, ``disable_adapter()``, module hooks).

1. Each stage of one module ([32, 197, 768], 14x14 grid, m = 64), plain-op and fused, forward and backward.
2. Plain ops vs fused in interleaved rounds with an A/A twin; what autograd saves for backward.
3. speed.py's train step (batch 8): Mona's compute (adapter hooks) and glue (from the profiler's Python stacks).
4. Glue per block call on a tiny model: wrapped vs plain, with adapters disabled, and the adapters alone.

    python -m benchmarks.profile_mona           # ~2-5 minutes on 2 cores
    python -m benchmarks.profile_mona --quick   # small shapes (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import common, speed
from mona_peft import MonaAdapter
from mona_peft.filters import merged_filter, merged_filter_params, reference_filter
from mona_peft.fused import scaled_norm_down

STAGE_NORM = "scaled norm: LN(x)*s1 + x*s2"
STAGE_DOWN = "down projection (C -> m)"
STAGE_NORM_DOWN = "scaled norm + down (fused function)"
STAGE_GRID = "to grid: split + transpose + reshape"
STAGE_MERGE = "merge the 3 kernels into one"
STAGE_CONV = "depthwise conv (merged 7x7)"
STAGE_CONVS = "depthwise convs (three, merge_filters=False)"
STAGE_CAT = "from grid + prefix-token cat"
STAGE_PROJ = "projector: 1x1 conv + skip, as (W + I)"
STAGE_GELU = "GELU + dropout"
STAGE_UP = "up projection (m -> C)"
STAGE_PREFIX = "zero prefix-token delta"
UNLINKED = "(backward, not linked: grad accumulation, ...)"
COMPUTE_LABEL = "mona: compute"
GLUE_FORWARD = "mona glue (aten ops in mona_peft outside the adapters): forward"
GLUE_BACKWARD = "mona glue (aten ops in mona_peft outside the adapters): backward"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
FB = ("forward_ms", "backward_ms")
# A Python frame as the profiler names it with with_stack=True: "path/to/file.py(123): function".
_FRAME = re.compile(r"^(?P<path>.+?\.py)\(\d+\): ")
# Files of the package that compute Mona itself; any other mona_peft file is glue (hooks, mixed-batch routing).
_COMPUTE_FILES = ("adapter.py", "fused.py", "filters.py")
_OTHER_OWNERS = ("transformers", "peft", "benchmarks")
# quick / full: module shapes (ViT-B/16, Swin-T stage 1), profiled iterations, interleaved rounds and calls per
# measurement, the train step's model, batch and iterations.
SETTINGS = {
    True: (dict(batch=2, prefix=1, grid=4, hidden=32, bottleneck=8), dict(batch=2, prefix=0, grid=8, hidden=16,
           bottleneck=8), 2, 3, 2, "tiny-vit", 2, 1),
    False: (dict(batch=32, prefix=1, grid=14, hidden=768, bottleneck=64), dict(batch=32, prefix=0, grid=56, hidden=96,
            bottleneck=64), 7, 11, 3, "vit-b", 8, 3),
}  # fmt: skip


def stages_of(adapter: MonaAdapter, num_prefix: int) -> tuple[str, ...]:
    """The stage labels :func:`staged_forward` records for ``adapter``'s settings, in order."""
    head = (STAGE_NORM_DOWN,) if adapter.fused else (STAGE_NORM, STAGE_DOWN)
    conv = (STAGE_MERGE, STAGE_CONV) if adapter.merge_filters else (STAGE_CONVS,)
    tail = (STAGE_PREFIX,) if num_prefix and adapter.prefix_tokens == "unchanged" else ()
    return (*head, STAGE_GRID, *conv, STAGE_CAT, STAGE_PROJ, STAGE_GELU, STAGE_UP, *tail)


def staged_forward(adapter: MonaAdapter, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """``adapter(x, grid, num_prefix)`` written out from the adapter's public sub-modules and parameters, with one
    ``record_function`` per stage (labels: :func:`stages_of`): the same ops in the same order as
    ``MonaAdapter.forward`` for parameters in ``x``'s dtype (checked bit-identical by :func:`check_staged`)."""
    (batch, _, channels), (height, width), norm, down = x.shape, grid, adapter.norm, adapter.down
    if adapter.fused:
        with record_function(STAGE_NORM_DOWN):
            scales = (adapter.scale_norm, adapter.scale_skip)
            h = scaled_norm_down(x, norm.weight, norm.bias, *scales, down.weight, down.bias, norm.eps)
    else:
        with record_function(STAGE_NORM):
            scaled = F.layer_norm(x, (channels,), norm.weight, norm.bias, norm.eps)
            scaled = scaled * adapter.scale_norm + x * adapter.scale_skip
        with record_function(STAGE_DOWN):
            h = F.linear(scaled, down.weight, down.bias)
    with record_function(STAGE_GRID):
        prefix, patches = h.split([num_prefix, height * width], dim=1)
        image = patches.transpose(1, 2).reshape(batch, -1, height, width)
    weights, biases = [conv.weight for conv in adapter.convs], [conv.bias for conv in adapter.convs]
    if adapter.merge_filters:
        with record_function(STAGE_MERGE):
            kernel, bias = merged_filter_params(weights, biases)
        with record_function(STAGE_CONV):
            image = F.conv2d(image, kernel, bias, padding=kernel.shape[-1] // 2, groups=image.shape[1])
    else:
        with record_function(STAGE_CONVS):
            image = reference_filter(image, weights, biases)
    with record_function(STAGE_CAT):
        patches = image.flatten(2).transpose(1, 2)
        h = torch.cat([prefix, patches], dim=1) if num_prefix else patches
    with record_function(STAGE_PROJ):
        weight = adapter.proj.weight.flatten(1)
        weight = weight + torch.eye(weight.shape[0], dtype=x.dtype, device=weight.device)
        h = F.linear(h, weight, adapter.proj.bias)
    with record_function(STAGE_GELU):
        h = F.dropout(F.gelu(h), adapter.dropout, adapter.training)
    with record_function(STAGE_UP):
        delta = F.linear(h, adapter.up.weight, adapter.up.bias)
    if num_prefix and adapter.prefix_tokens == "unchanged":
        with record_function(STAGE_PREFIX):
            delta = torch.cat([delta.new_zeros(batch, num_prefix, channels), delta[:, num_prefix:]], dim=1)
    return delta


def check_staged(adapter: MonaAdapter, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> None:
    """Raise unless :func:`staged_forward` gives bit-identical results to the adapter's own forward (in eval mode, so
    that dropout is off; the adapter's mode is then restored)."""
    mode = adapter.training
    adapter.eval()
    with torch.no_grad():
        if not torch.equal(staged_forward(adapter, x, grid, num_prefix), adapter(x, grid, num_prefix)):
            raise AssertionError(f"staged_forward differs from MonaAdapter.forward (fused={adapter.fused}, "
                                 f"merge_filters={adapter.merge_filters}); update the copy")  # fmt: skip
    adapter.train(mode)


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _ancestors(event: Any) -> Iterator[Any]:
    while (event := event.cpu_parent) is not None:
        yield event


def _in_backward(event: Any) -> bool:
    return any(a.name.startswith(BACKWARD_PREFIX) for a in _ancestors(event))


def charge(events: list[Any], roots: Iterable[tuple[str, Any]], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """Forward ms of each ``(name, event)`` root, and backward ms of the outermost autograd nodes created by the root
    or any op under it (same autograd sequence number), by name; unlinked nodes under :data:`UNLINKED`."""
    out, owner = {name: dict.fromkeys(FB, 0.0) for name in (*names, UNLINKED)}, {}
    for name, root in roots:
        out[name]["forward_ms"] += root.cpu_time_total / 1e3
        owner |= {d.sequence_nr: name for d in (root, *_descendants(root)) if d.sequence_nr >= 0}
    for e in events:
        if e.name.startswith(BACKWARD_PREFIX) and not _in_backward(e):
            out[owner.get(e.sequence_nr, UNLINKED)]["backward_ms"] += e.cpu_time_total / 1e3
    return out


def self_times(events: list[Any], name_of: Callable[[Any], str | None]) -> dict[str, dict[str, float]]:
    """Self ms of the ops ``name_of`` names, by that name, split into forward and backward."""
    table: dict[str, dict[str, float]] = {}
    for e in events:
        if (name := name_of(e)) is not None:
            table.setdefault(name, dict.fromkeys(FB, 0.0))[FB[_in_backward(e)]] += e.self_cpu_time_total / 1e3
    return table


def copy_caller(event: Any) -> str | None:
    """For ``aten::copy_``: the op that called it, through contiguous/clone/to (where layouts change and casts run)."""
    wrappers = ("aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to")
    if event.name == "aten::copy_":
        return next((a.name for a in _ancestors(event) if a.name not in wrappers), "(top level)")
    return None


def is_glue(event: Any) -> bool:
    """A top-level aten op in forward (nested ones count with their caller) whose nearest frame of mona_peft,
    transformers, peft or the benchmarks on the profiler's Python stack is a mona_peft file not in _COMPUTE_FILES."""
    nested = event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::")
    if not event.name.startswith("aten::") or nested or _in_backward(event):
        return False
    for frame in (m for a in _ancestors(event) if (m := _FRAME.match(a.name))):
        path = "/" + frame["path"].replace("\\", "/")
        if any(f"/{library}/" in path for library in ("mona_peft", *_OTHER_OWNERS)):
            return "/mona_peft/" in path and path.rsplit("/", 1)[-1] not in _COMPUTE_FILES
    return False


def _median_tables(tables: tuple[dict[str, dict[str, float]], ...]) -> dict[str, dict[str, float]]:
    keys = dict.fromkeys(k for t in tables for k in t)
    return {k: {f: statistics.median(t.get(k, {}).get(f, 0.0) for t in tables) for f in FB} for k in keys}


def module_setup(shape: dict[str, int], seed: int, fused: bool = False) -> tuple[Any, ...]:
    """A Mona module of ``shape`` with non-trivial weights (official init: the up projection is not zero), its input,
    an output gradient, the grid and the prefix-token count."""
    torch.manual_seed(seed)
    adapter = MonaAdapter(shape["hidden"], bottleneck_dim=shape["bottleneck"], init_weights="official")
    adapter.fused, grid, generator = fused, (shape["grid"], shape["grid"]), torch.Generator().manual_seed(seed)
    x = torch.randn(shape["batch"], shape["prefix"] + grid[0] * grid[1], shape["hidden"], generator=generator)
    return adapter, x, torch.randn(x.shape, generator=generator), grid, shape["prefix"]


def one_pass(forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, x: torch.Tensor,
             grad: torch.Tensor, train: bool) -> Callable[[], None]:  # fmt: skip
    """``module`` in train (or eval) mode, and a pass of ``forward``: with backward, gradients dropped (or no grad)."""
    module.train(train)

    def run() -> None:
        if train:
            forward(x.detach().requires_grad_(True)).backward(grad)
            module.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                forward(x)

    return run


def module_breakdown(shape: dict[str, int], iterations: int, seed: int, fused: bool = False) -> dict[str, Any]:
    """Per-stage and per-op breakdown of one Mona module, plain-op or fused (train: forward + backward; inference)."""
    adapter, x, grad, grid, num_prefix = module_setup(shape, seed, fused)
    check_staged(adapter, x, grid, num_prefix)  # the instrumented copy computes exactly what the adapter computes
    labels, result = stages_of(adapter, num_prefix), {"fused": fused, "merge_filters": adapter.merge_filters}
    for mode in ("train", "inference"):
        run = one_pass(lambda v: staged_forward(adapter, v, grid, num_prefix), adapter, x, grad, mode == "train")
        run(), run()
        tables, totals = [], []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                totals.append((time.perf_counter() - start) * 1e3)
            events = list(prof.events())
            stages = charge(events, ((e.name, e) for e in events if e.name in labels), labels)
            aten = self_times(events, lambda e: e.name if e.name.startswith("aten::") else None)
            tables.append((stages, aten, self_times(events, copy_caller)))
        stages, ops, copies = map(_median_tables, zip(*tables, strict=True))
        top = dict(sorted(ops.items(), key=lambda kv: -sum(kv[1].values()))[:14])
        result[mode] = {"total_ms": common.describe(totals), "stages": stages, "top_ops": top, "copy_parents": copies}
    return result


def saved_tensor_mib(adapter: MonaAdapter, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> float:
    """MiB of distinct storages autograd keeps for backward of ``adapter``'s forward (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter(x.detach().requires_grad_(True), grid, num_prefix)
    return sum(storages.values()) / 2**20


def module_comparison(shape: dict[str, int], rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Interleaved timing of one Mona module: plain ops (``fused=False``), its A/A twin (the same module again), and
    the fused form (a copy, same weights, ``fused=True``); and what autograd saves for backward in each form."""
    unfused, x, grad, grid, num_prefix = module_setup(shape, seed)
    fused, rng = copy.deepcopy(unfused), random.Random(seed)
    fused.fused, variants = True, {"unfused": unfused, "unfused_twin": unfused, "fused": fused}
    result: dict[str, Any] = {"shape": shape, "rounds": rounds, "calls_per_measurement": inner}
    for mode in ("train", "inference"):
        calls = {name: one_pass(lambda v, a=a: a(v, grid, num_prefix), a, x, grad, mode == "train")
                 for name, a in variants.items()}  # fmt: skip
        records = common.interleave(calls, rounds, inner, rng)
        pairs = ["fused/unfused", "unfused_twin/unfused"]
        result[mode] = {"ms": common.per_method(records), "ratios": common.ratios(records, pairs)}
    result["saved_for_backward_mib"] = {
        name: saved_tensor_mib(a, x, grid, num_prefix) for name, a in (("unfused", unfused), ("fused", fused))
    }
    return result


def filter_variants(shape: dict[str, int], rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """The filter alone in eval (no grad): merged as in src (kernel merged every call), merged with a cached kernel,
    three convs; to size the kernel-cache idea."""
    torch.manual_seed(seed)
    image, weights, biases = common.filter_input(shape["batch"], shape["bottleneck"], shape["grid"])
    with torch.no_grad():
        kernel, bias = merged_filter_params(weights, biases)
        variants = {"merged (src)": lambda: merged_filter(image, weights, biases),
                    "merged, cached kernel": lambda: F.conv2d(image, kernel, bias, padding=3, groups=image.shape[1]),
                    "three convs (reference)": lambda: reference_filter(image, weights, biases)}  # fmt: skip
        records = common.interleave(variants, rounds, inner, random.Random(seed))
    pairs = (("cached/src", "merged, cached kernel"), ("reference/src", "three convs (reference)"))
    ratios = {name: common.paired_ratios(records, variant, "merged (src)", "ms") for name, variant in pairs}
    return {"shape": shape, "ms": common.per_method(records), "ratios": ratios}


def op_costs(rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """A few ops on one [32, 197, 768] activation (ViT-B/16, batch 32): what a full-width pass costs here."""
    generator = torch.Generator().manual_seed(seed)
    x, gamma, beta, down, down2 = (torch.randn(*s, generator=generator) for s in
                                   ((32, 197, 768), (768,), (768,), (64, 768), (128, 768)))  # fmt: skip
    ops = {
        "x * s (broadcast multiply)": lambda: x * gamma,
        "addcmul(x, x, s)": lambda: torch.addcmul(x, x, gamma),
        "layer_norm (with affine)": lambda: F.layer_norm(x, (768,), gamma, beta),
        "var_mean over C": lambda: torch.var_mean(x, -1, keepdim=True, correction=0),
        "linear C -> 64 (down projection)": lambda: F.linear(x, down),
        "linear C -> 128": lambda: F.linear(x, down2),
    }
    with torch.no_grad():
        records = common.interleave(ops, rounds, inner, random.Random(seed))
    return {"shape": [32, 197, 768], "ms": common.per_method(records)}


def train_step_breakdown(model_key: str, batch: int, iterations: int, seed: int) -> dict[str, Any]:
    """Profile speed.py's Mona train step (its ranges: forward, backward, optimizer) and Mona's compute and glue within
    it: the adapters' ranges, and the top-level aten ops called from mona_peft outside them. The profiler's Python
    tracing slows the step a little: the shares are the point, the step's time is in docs/benchmarks.md."""
    bench = speed.MethodBench(model_key, "mona", torch.get_num_threads(), seed, None)
    adapters = [m for m in bench.model.modules() if isinstance(m, MonaAdapter)]
    for module, ranges in ((m, []) for m in adapters):  # a range from each adapter's forward pre-hook to its hook
        module.register_forward_pre_hook(lambda *_, r=ranges: r.append(record_function(COMPUTE_LABEL).__enter__()))
        module.register_forward_hook(lambda *_, r=ranges: r.pop().__exit__(None, None, None))

    def root(e: Any) -> str | None:
        return "compute" if e.name == COMPUTE_LABEL else "glue" if is_glue(e) else None

    bench.step("train", batch)
    rows = []
    for _ in range(iterations):
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            start = time.perf_counter()
            bench.step("train", batch)
            row = {"wall_ms": (time.perf_counter() - start) * 1e3}
        events = list(prof.events())
        row |= {e.name: e.cpu_time_total / 1e3 for e in events if e.name.startswith("step: ")}
        found = charge(events, [(name, e) for e in events if (name := root(e))], ("compute", "glue"))
        row["mona compute: forward"], row["mona compute: backward"] = found["compute"].values()
        row[GLUE_FORWARD], row[GLUE_BACKWARD] = found["glue"].values()
        rows.append(row)
    found = {"model": bench.spec.name, "batch": batch, "iterations": iterations, "adapters": len(adapters)}
    keys = dict.fromkeys(k for r in rows for k in r)
    return found | {"median_ms": {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}}


def flop_bounds(model_key: str, bottleneck: int = 64, lora_rank: int = 16) -> dict[str, Any]:
    """Multiply-adds per image of the backbone's blocks, of Mona and of LoRA r=16 q/v, and the ratios they imply:
    matmuls and convs only (what no implementation avoids). Training: the frozen backbone runs forward + input
    gradients (2x forward), the adapters forward + input and weight gradients (3x), full FT 3x the backbone."""
    spec, config = common.MODELS[model_key], common.MODELS[model_key].config()
    if spec.family == "swin":
        side = config.image_size // config.patch_size
        stages = [(config.embed_dim * 2**i, (side // 2**i) ** 2, depth, config.window_size**2)
                  for i, depth in enumerate(config.depths)]  # fmt: skip
    else:
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        stages = [(config.hidden_size, tokens, config.num_hidden_layers, tokens)]
    backbone = mona = lora = 0
    per_stage = []
    for width, tokens, depth, attended in stages:
        block = 12 * width * width + 2 * attended * width  # q, k, v, o + 4x MLP; scores and weighted sum
        adapter = 2 * (2 * width * bottleneck + bottleneck * bottleneck + 49 * bottleneck)  # two Monas, merged 7x7
        backbone, mona = backbone + tokens * depth * block, mona + tokens * depth * adapter
        lora += tokens * depth * 2 * 2 * width * lora_rank  # A and B on q and v
        per_stage.append({"width": width, "tokens": tokens, "blocks": depth, "mona_share_of_block": adapter / block})
    found = {"model": spec.name, "backbone_block_macs": backbone, "mona_macs": mona, "lora_macs": lora}
    found |= {"stages": per_stage, "bound_inference_mona_over_frozen": (backbone + mona) / backbone}
    found |= {"bound_train_mona_over_lora": (2 * backbone + 3 * mona) / (2 * backbone + 3 * lora)}
    return found | {"bound_train_mona_over_full": (2 * backbone + 3 * mona) / (3 * backbone)}


def hook_overhead(rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Cost of Mona's glue per block call on a 12-block tiny ViT: plain; wrapped with its adapters disabled
    (``disable_adapter()``); wrapped with Mona; its Mona modules alone, on the inputs they got in a wrapped forward
    (captured with forward hooks). Glue per block = (Mona - plain - modules alone) / blocks; an idle wrapper per
    block = (disabled - plain) / blocks."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    config = common.MODELS["tiny-vit"].config(num_hidden_layers=12, num_attention_heads=2)  # hidden 32, image 32
    plain = ViTForImageClassification(config).eval()
    wrapped = get_peft_model(ViTForImageClassification(config), common.mona_config(bottleneck_dim=8)).eval()
    pixels, calls = torch.randn(1, 3, 32, 32), []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> None:
        calls.append((module, tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    adapters = [m for m in wrapped.modules() if isinstance(m, MonaAdapter)]
    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in adapters]
    with torch.no_grad():
        wrapped(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    forward = {"plain": plain, "wrapped, adapters disabled": wrapped, "mona": wrapped}
    variants = {name: (lambda m=m: m(pixel_values=pixels)) for name, m in forward.items()}
    variants["mona modules alone"] = lambda: [m(*a, **k) for m, a, k in calls]
    # Timed at 1 thread: microsecond-scale work, keep OpenMP barriers (and other processes) out of it. The disabled
    # wrapper's context is entered around its timed calls, outside the timer.
    with torch.no_grad():
        contexts = {"wrapped, adapters disabled": wrapped.disable_adapter}
        records = common.interleave(variants, rounds, inner, random.Random(seed), contexts, threads=1)
    records = [{**r, "us": r["ms"] * 1e3} for r in records]
    by_round = [{r["method"]: r["us"] for r in records if r["round"] == i} for i in range(rounds)]
    blocks = config.num_hidden_layers
    glue = [(row["mona"] - row["plain"] - row["mona modules alone"]) / blocks for row in by_round]
    idle = [(row["wrapped, adapters disabled"] - row["plain"]) / blocks for row in by_round]
    found = {"model": f"tiny ViT, {blocks} blocks, hidden 32, 17 tokens, batch 1, no grad, 1 thread"}
    found["mona_modules_per_forward"], us = len(calls), common.per_method(records, "us")
    found |= {"us_per_forward": {name: us[name] for name in variants}, "glue_us_per_block_call": common.describe(glue)}
    return found | {"idle_wrapper_us_per_block_call": common.describe(idle)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Profile, and write ``profile.json`` (``profile_quick.json`` with ``--quick``); returns what it wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default profile, or profile_quick)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    shape, swin_shape, iters, rounds, inner, *step = SETTINGS[args.quick]
    threads_before, started, seed = torch.get_num_threads(), time.perf_counter(), args.seed
    torch.set_num_threads(args.threads or threads_before)
    payload: dict[str, Any] = {"benchmark": "profile", "quick": args.quick, "machine": common.machine_info()}
    try:  # main() also runs in-process (tests): the thread count is given back as found
        print("module breakdown ...", flush=True)
        for key, fused in (("module", False), ("module_fused", True)):
            payload[key] = {"shape": shape, "iterations": iters, **module_breakdown(shape, iters, seed, fused)}
        print("unfused vs fused ...", flush=True)
        payload["fused_module"] = {"vit-b": module_comparison(shape, rounds, inner, seed),
                                   "swin-t stage 1": module_comparison(swin_shape, rounds, inner, seed)}  # fmt: skip
        payload["filter_variants"] = filter_variants(shape, rounds, inner * 3, seed)
        payload["op_costs"] = op_costs(max(3, rounds // 2), inner * 2, seed)
        payload["flops"] = {key: flop_bounds(key) for key in ("vit-b", "swin-t")}
        print("train step ...", flush=True)
        payload["train_step"] = train_step_breakdown(*step, seed)
        print("hook overhead ...", flush=True)
        payload["hooks"] = hook_overhead(rounds * 2, inner * 10, seed)
    finally:
        torch.set_num_threads(threads_before)
    payload |= {"load_average_at_end": common.load_average(), "seconds": round(time.perf_counter() - started, 1)}
    path = common.write_results(args.name or ("profile_quick" if args.quick else "profile"), payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
