"""Where Mona's time goes: torch.profiler on one Mona module at ViT-B/16 shapes and on a ViT-B/16 train step, through
the public API only (``MonaAdapter`` and its ``fused`` / ``merge_filters`` flags, module hooks).

1. Each stage of one module ([32, 197, 768], 14x14 grid, m = 64), plain-op and fused, forward and backward.
2. Plain ops vs fused in interleaved rounds with an A/A twin; what autograd saves for backward.
3. speed.py's train step (batch 8): Mona's compute (adapter hooks) and glue (from the profiler's Python stacks).

    python -m benchmarks.profile_mona           # ~2-5 minutes on 2 cores
    python -m benchmarks.profile_mona --quick   # small shapes (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import linecache
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import common, speed
from mona_peft import MonaAdapter

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
GLUE_PYTHON = "mona glue (Python in mona_peft outside the adapters, self time under the profiler)"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
FORWARD = "MonaAdapter.forward"
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


# The stage of a torch call: the first label whose snippet occurs in "<file> <function>: <source line>" of the nearest
# calling frame in Mona's compute files, so the adapter's own forward is profiled (no copy of it here); a call that
# matches none and runs an aten op makes :func:`unstaged_ops` complain.
STAGES = (("F.layer_norm(", STAGE_NORM), ("cast(self.scale_norm)", STAGE_NORM), ("F.linear(scaled,", STAGE_DOWN),
          ("fused.py ", STAGE_NORM_DOWN), (".split([num_prefix", STAGE_GRID), ("spatial(patches.", STAGE_GRID),
          ("merged_filter_params:", STAGE_MERGE), ("merged_filter:", STAGE_CONV), ("depthwise_conv:", STAGE_CONV),
          ("filters.py forward:", STAGE_CONV), ("reference_filter:", STAGE_CONVS),
          ("image.flatten(2)", STAGE_CAT), ("torch.cat([prefix", STAGE_CAT), ("self.proj.", STAGE_PROJ),
          ("torch.eye(", STAGE_PROJ), ("F.gelu(", STAGE_GELU), ("self.up.", STAGE_UP),
          ("new_zeros(", STAGE_PREFIX))  # fmt: skip
LABELS = tuple(dict.fromkeys(label for _, label in STAGES))


class StageRanges(TorchFunctionMode):
    """While active, each torch call that Mona's compute files make runs in a ``record_function`` range named after
    its stage (:data:`STAGES`). Enter it around the adapter's forward only (not backward)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        frame, label = sys._getframe(1), None
        while frame is not None and Path(frame.f_code.co_filename).name not in _COMPUTE_FILES:
            frame = frame.f_back
        if frame is not None:
            file, line = frame.f_code.co_filename, frame.f_lineno
            where = f"{Path(file).name} {frame.f_code.co_name}: {linecache.getline(file, line)}"
            label = next((stage for snippet, stage in STAGES if snippet in where), None)
        with record_function(label) if label else contextlib.nullcontext():
            return func(*args, **(kwargs or {}))


def unstaged_ops(events: list[Any], root: str) -> list[str]:
    """Top-level aten ops under the ``root`` ranges in no stage's range (none, when :data:`STAGES` is complete)."""
    found = []
    for r in (e for e in events if e.name == root):
        for e in _descendants(r):
            chain = itertools.takewhile(lambda a, r=r: a is not r, _ancestors(e))
            if e.name.startswith("aten::") and not any(a.name.startswith(("aten::", *LABELS)) for a in chain):
                found.append(e.name)
    return found


def staged(adapter: MonaAdapter, grid: tuple[int, int], num_prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``adapter``'s forward in a range named :data:`FORWARD`, its stages in ranges (:class:`StageRanges`)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with record_function(FORWARD), StageRanges():
            return adapter(x, grid, num_prefix)

    return forward


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
        # ancestors too: an autograd Function's own event (it creates the backward node) encloses its forward's ops
        owner |= {d.sequence_nr: name for d in (*_ancestors(root), root, *_descendants(root)) if d.sequence_nr >= 0}
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
            return glue_file(frame["path"])
    return False


def glue_file(path: str) -> bool:
    """A file of mona_peft that does not compute Mona itself (hooks, grids, mixed-batch routing)."""
    path = "/" + path.replace("\\", "/")
    return "/mona_peft/" in path and path.rsplit("/", 1)[-1] not in _COMPUTE_FILES


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
    result = {"fused": fused, "merge_filters": adapter.merge_filters}
    for mode in ("train", "inference"):
        run = one_pass(staged(adapter, grid, num_prefix), adapter, x, grad, mode == "train")
        run(), run()
        tables, totals = [], []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                totals.append((time.perf_counter() - start) * 1e3)
            events = list(prof.events())
            if missed := unstaged_ops(events, FORWARD):
                raise AssertionError(f"aten ops of MonaAdapter.forward in no stage: {missed}; extend STAGES")
            labels = [label for label in LABELS if any(e.name == label for e in events)]
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
    it: the adapters' ranges, the top-level aten ops called from mona_peft outside them, and the self time of its
    Python functions outside them (hooks, grids; inflated by the profiler's own Python tracing). The profiler's Python
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
        python = (e for e in events if (frame := _FRAME.match(e.name)) and glue_file(frame["path"]))
        row[GLUE_PYTHON] = sum(e.self_cpu_time_total for e in python) / 1e3
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
        payload["op_costs"] = op_costs(max(3, rounds // 2), inner * 2, seed)
        payload["flops"] = {key: flop_bounds(key) for key in ("vit-b", "swin-t")}
        print("train step ...", flush=True)
        payload["train_step"] = train_step_breakdown(*step, seed)
    finally:
        torch.set_num_threads(threads_before)
    payload |= {"load_average_at_end": common.load_average(), "seconds": round(time.perf_counter() - started, 1)}
    path = common.write_results(args.name or ("profile_quick" if args.quick else "profile"), payload, args.results_dir)
    print(f"wrote {path} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
