"""Where Mona's time goes: torch.profiler on one Mona module at ViT-B/16 shapes and on a full ViT-B/16 train step.

Everything here goes through the package's public API: :class:`mona_peft.MonaAdapter` (one Mona module) and its
``fused`` / ``merge_filters`` flags, ``mona_peft.set_compute``, PEFT's ``disable_adapter()``, and ordinary module
hooks and ``torch.profiler``; nothing in the package is patched.

1. **One module** (a ``MonaAdapter`` at [32, 197, 768], 14x14 grid, bottleneck 64), in both of its forms: the
   plain-op reference (``fused=False``, what this profile was first made for, and what motivated the fused form) and
   the default fused form. :func:`staged_forward` runs the adapter's own sub-modules and parameters through the same
   ops, in the same order, as ``MonaAdapter.forward``, with a ``record_function`` per stage; it is checked to give
   bit-identical results to ``adapter(x, grid, num_prefix)`` before anything is timed. Every backward node is
   charged to the stage whose forward op created it (autograd sequence numbers). Each iteration is profiled on its
   own; tables show the median over iterations.
2. **Module, plain ops (``fused=False``) vs fused (default)**, interleaved rounds with an A/A pair.
3. **A full train step** (ViT-B/16, batch 8, Mona, AdamW): forward / backward / optimizer, and Mona's share of each:
   its compute (ranges opened and closed by forward pre-hooks and hooks on every ``MonaAdapter``) and the glue around
   it (the aten ops that run in ``mona_peft`` outside the adapters: residual adds, mixed-batch routing; found from the
   profiler's Python stacks).
4. **Glue per block call** on a tiny model: the wrapped model against the plain one, with its adapters disabled
   (``with model.disable_adapter():``), and against its adapters called on their own with the inputs they got.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import (
    HEAD,
    MODELS,
    build_classifier,
    describe,
    interleave,
    load_average,
    machine_info,
    mona_config,
    paired_ratios,
    per_method,
    write_results,
)
from mona_peft import MonaAdapter
from mona_peft.filters import merged_filter, merged_filter_params, reference_filter
from mona_peft.fused import scaled_norm_down

BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
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


def stages_of(adapter: MonaAdapter, num_prefix: int) -> tuple[str, ...]:
    """The stage labels :func:`staged_forward` records for ``adapter``'s settings, in order."""
    head = (STAGE_NORM_DOWN,) if adapter.fused else (STAGE_NORM, STAGE_DOWN)
    conv = (STAGE_MERGE, STAGE_CONV) if adapter.merge_filters else (STAGE_CONVS,)
    tail = (STAGE_PREFIX,) if num_prefix and adapter.prefix_tokens == "unchanged" else ()
    return (*head, STAGE_GRID, *conv, STAGE_CAT, STAGE_PROJ, STAGE_GELU, STAGE_UP, *tail)


# ------------------------------------------------------------------------------------- the module, stage by stage


def staged_forward(adapter: MonaAdapter, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """``adapter(x, grid, num_prefix)`` written out from the adapter's public sub-modules and parameters, with one
    ``record_function`` per stage (labels: :func:`stages_of`): the same ops in the same order as
    ``MonaAdapter.forward`` for parameters in ``x``'s dtype (checked for bit-identical results by
    :func:`check_staged`)."""
    if any(p.dtype != x.dtype for p in adapter.parameters()):
        raise ValueError("staged_forward mirrors the path without casts: parameters and input in one dtype")
    batch, tokens, channels = x.shape
    height, width = grid
    if tokens != num_prefix + height * width:
        raise ValueError(f"{tokens} tokens do not fit a {height}x{width} grid with {num_prefix} prefix token(s)")
    norm, down = adapter.norm, adapter.down
    if adapter.fused:
        with record_function(STAGE_NORM_DOWN):
            h = scaled_norm_down(
                x, norm.weight, norm.bias, adapter.scale_norm, adapter.scale_skip, down.weight, down.bias, norm.eps
            )
    else:
        with record_function(STAGE_NORM):
            scaled = F.layer_norm(x, (channels,), norm.weight, norm.bias, norm.eps)
            scaled = scaled * adapter.scale_norm + x * adapter.scale_skip
        with record_function(STAGE_DOWN):
            h = F.linear(scaled, down.weight, down.bias)
    with record_function(STAGE_GRID):
        prefix, patches = h.split([num_prefix, height * width], dim=1)
        image = patches.transpose(1, 2).reshape(batch, -1, height, width)
    weights = [conv.weight for conv in adapter.convs]
    biases = [conv.bias for conv in adapter.convs]
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
    """Raise unless :func:`staged_forward` gives bit-identical results to the adapter's own forward (eval mode, so
    that dropout is off; the adapter's mode is restored)."""
    mode = adapter.training
    adapter.eval()
    try:
        with torch.no_grad():
            if not torch.equal(staged_forward(adapter, x, grid, num_prefix), adapter(x, grid, num_prefix)):
                raise AssertionError(
                    f"staged_forward differs from MonaAdapter.forward (fused={adapter.fused}, "
                    f"merge_filters={adapter.merge_filters}); update the copy"
                )
    finally:
        adapter.train(mode)


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


def make_adapter(shape: dict[str, int], seed: int = 0, fused: bool = False) -> MonaAdapter:
    """A Mona module of width ``shape["hidden"]`` and bottleneck ``shape["bottleneck"]`` with non-trivial weights
    (the official init, whose up projection is not zero)."""
    torch.manual_seed(seed)
    adapter = MonaAdapter(shape["hidden"], bottleneck_dim=shape["bottleneck"], init_weights="official")
    adapter.fused = fused
    return adapter


def _module_input(shape: dict[str, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
    grid = (shape["grid"], shape["grid"])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape["batch"], shape["prefix"] + grid[0] * grid[1], shape["hidden"], generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    return x, grad, grid, shape["prefix"]


def module_breakdown(shape: dict[str, int], iterations: int, seed: int, fused: bool = False) -> dict[str, Any]:
    """Per-stage and per-op breakdown of one Mona module (train: forward + backward; inference: forward), in its
    plain-op form (``fused=False``) or its fused one."""
    adapter = make_adapter(shape, seed, fused=fused)
    x, grad, grid, num_prefix = _module_input(shape, seed)
    check_staged(adapter, x, grid, num_prefix)  # the instrumented copy computes exactly what the adapter computes
    labels = stages_of(adapter, num_prefix)

    result: dict[str, Any] = {"fused": fused, "merge_filters": adapter.merge_filters}
    for mode in ("train", "inference"):
        adapter.train(mode == "train")

        def run(mode: str = mode) -> None:
            if mode == "train":
                xi = x.detach().requires_grad_(True)
                staged_forward(adapter, xi, grid, num_prefix).backward(grad)
                adapter.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    staged_forward(adapter, x, grid, num_prefix)

        for _ in range(2):
            run()
        stages, ops, copies, totals = [], [], [], []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                totals.append((time.perf_counter() - start) * 1e3)
            events = list(prof.events())
            stages.append(attribute(events, labels))
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
    """Interleaved timing of one Mona module: plain ops (``fused=False``), its A/A twin (the same module again), and
    the fused form (a copy of the module, same weights, ``fused=True``)."""
    unfused = make_adapter(shape, seed, fused=False)
    fused = copy.deepcopy(unfused)
    fused.fused = True
    x, grad, grid, num_prefix = _module_input(shape, seed)
    variants: dict[str, MonaAdapter] = {"unfused": unfused, "unfused_twin": unfused, "fused": fused}
    rng = random.Random(seed)
    result: dict[str, Any] = {"shape": shape, "rounds": rounds, "calls_per_measurement": inner}
    for mode in ("train", "inference"):
        for adapter in variants.values():
            adapter.train(mode == "train")

        def run(adapter: MonaAdapter, mode: str = mode) -> None:
            if mode == "train":
                adapter(x.detach().requires_grad_(True), grid, num_prefix).backward(grad)
                adapter.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    adapter(x, grid, num_prefix)

        calls = {name: (lambda adapter=adapter, run=run: run(adapter)) for name, adapter in variants.items()}
        records = interleave(calls, rounds, inner, rng)
        pairs = {"fused/unfused": ("fused", "unfused"), "unfused_twin/unfused": ("unfused_twin", "unfused")}
        ratios = {name: paired_ratios(records, *pair, "ms") for name, pair in pairs.items()}
        result[mode] = {"ms": per_method(records), "ratios": ratios}
    result["saved_for_backward_mib"] = {
        name: saved_tensor_mib(lambda adapter=adapter: adapter(x.detach().requires_grad_(True), grid, num_prefix))
        for name, adapter in (("unfused", unfused), ("fused", fused))
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
    with torch.no_grad():
        kernel, bias = merged_filter_params(weights, biases)
        variants = {
            "merged (src)": lambda: merged_filter(image, weights, biases),
            "merged, cached kernel": lambda: F.conv2d(image, kernel, bias, padding=3, groups=m),
            "three convs (reference)": lambda: reference_filter(image, weights, biases),
        }
        records = interleave(variants, rounds, inner, random.Random(seed))
    ratios = {
        "cached/src": paired_ratios(records, "merged, cached kernel", "merged (src)", "ms"),
        "reference/src": paired_ratios(records, "three convs (reference)", "merged (src)", "ms"),
    }
    return {"shape": shape, "ms": per_method(records), "ratios": ratios}


# ---------------------------------------------------------------------------------------------- a full train step


COMPUTE_LABEL = "mona: compute"
GLUE_FORWARD = "mona glue (aten ops in mona_peft outside the adapters): forward"
GLUE_BACKWARD = "mona glue (aten ops in mona_peft outside the adapters): backward"
# A Python frame as the profiler names it with with_stack=True: "path/to/file.py(123): function".
_FRAME = re.compile(r"^(?P<path>.+?\.py)\(\d+\): ")
# Files of the package that compute Mona itself; any other mona_peft file is glue (the tuner layer's hooks, the
# model's forward hooks for mixed batches, ...).
_COMPUTE_FILES = ("adapter.py", "fused.py", "filters.py")
_OTHER_OWNERS = ("transformers", "peft", "benchmarks")


def label_adapters(model: torch.nn.Module, label: str = COMPUTE_LABEL) -> list[Any]:
    """Open a ``record_function(label)`` range when a ``MonaAdapter`` of ``model`` starts its forward and close it
    when it returns (ordinary forward pre-hooks and hooks); returns the hook handles (``.remove()`` them after)."""
    handles = []
    for module in model.modules():
        if isinstance(module, MonaAdapter):
            ranges: list[Any] = []

            def enter(_module: Any, _args: Any, ranges: list[Any] = ranges) -> None:
                ranges.append(record_function(label).__enter__())

            def leave(_module: Any, _args: Any, _output: Any, ranges: list[Any] = ranges) -> None:
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def owner_of(event: Any) -> str | None:
    """Who called an op, from the profiler's Python stack: the nearest enclosing frame of mona_peft, transformers,
    peft or the benchmarks (frames of torch and the standard library are looked through). ``"compute"``: mona_peft's
    adapter, fused function or filters; ``"glue"``: any other mona_peft file; ``None``: anything else."""
    parent = event.cpu_parent
    while parent is not None:
        match = _FRAME.match(parent.name)
        if match:
            path = "/" + match["path"].replace("\\", "/")
            if "/mona_peft/" in path:
                return "compute" if path.rsplit("/", 1)[-1] in _COMPUTE_FILES else "glue"
            if any(f"/{library}/" in path for library in _OTHER_OWNERS):
                return None
        parent = parent.cpu_parent
    return None


def glue_times(events: list[Any]) -> tuple[float, float]:
    """Forward and backward ms of the glue: top-level aten ops called from mona_peft outside the adapters, and the
    backward nodes those ops created."""
    forward = 0.0
    owned: set[int] = set()
    for e in events:
        if not e.name.startswith("aten::") or _in_backward(e):
            continue
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
            continue  # counted with its caller
        if owner_of(e) != "glue":
            continue
        forward += _ms(e.cpu_time_total)
        owned.update(d.sequence_nr for d in (e, *_descendants(e)) if d.sequence_nr >= 0)
    backward = sum(
        _ms(e.cpu_time_total)
        for e in events
        if e.name.startswith(BACKWARD_PREFIX) and e.sequence_nr in owned and not _in_backward(e)
    )
    return forward, backward


def train_step_breakdown(model_key: str, batch: int, iterations: int, seed: int) -> dict[str, Any]:
    """Profile a Mona train step: forward, backward, optimizer; Mona's compute and glue within them.

    Compute: ``record_function`` ranges opened and closed by hooks on every ``MonaAdapter`` (backward charged through
    autograd sequence numbers, as for the stages). Glue: the profiler's Python stacks (``with_stack=True``) say which
    aten ops ran in mona_peft outside the adapters. The profiler's Python tracing slows the step a little; the
    shares are what this section is for, the step's time is in docs/benchmarks.md.
    """
    spec = MODELS[model_key]
    torch.manual_seed(seed)
    model = get_peft_model(build_classifier(spec), mona_config(modules_to_save=[HEAD])).train()
    handles = label_adapters(model)
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

    try:
        step()
        rows = []
        for _ in range(iterations):
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                start = time.perf_counter()
                step()
                wall = (time.perf_counter() - start) * 1e3
            events = list(prof.events())
            row = {"wall_ms": wall}
            for e in events:
                if e.name.startswith("step: "):
                    row[e.name] = _ms(e.cpu_time_total)
            compute = attribute(events, (COMPUTE_LABEL,))[COMPUTE_LABEL]
            row["mona compute: forward"] = compute["forward_ms"]
            row["mona compute: backward"] = compute["backward_ms"]
            row[GLUE_FORWARD], row[GLUE_BACKWARD] = glue_times(events)
            rows.append(row)
    finally:
        for handle in handles:
            handle.remove()
    keys = dict.fromkeys(k for r in rows for k in r)
    return {
        "model": spec.name,
        "batch": batch,
        "iterations": iterations,
        "adapters": sum(isinstance(m, MonaAdapter) for m in model.modules()),
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
    with torch.no_grad():
        records = interleave(ops, rounds, inner, random.Random(seed))
    return {"shape": [32, 197, 768], "ms": per_method(records)}


# ------------------------------------------------------------------------------------------------- hook overhead


def hook_overhead(rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Cost of Mona's glue per block call: a 12-block tiny ViT, plain; wrapped with its adapters disabled
    (``disable_adapter()``); wrapped with Mona; and its Mona modules alone, called on the inputs they got in a
    wrapped forward (captured once with forward hooks). Glue per block = (Mona - plain - modules alone) / blocks;
    an idle wrapper per block = (disabled - plain) / blocks."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    plain = ViTForImageClassification(config).eval()
    wrapped = get_peft_model(ViTForImageClassification(config), mona_config(bottleneck_dim=8)).eval()
    pixels = torch.randn(1, 3, 32, 32)

    calls: list[tuple[MonaAdapter, tuple[Any, ...], dict[str, Any]]] = []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> None:
        calls.append((module, tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    adapters = [m for m in wrapped.modules() if isinstance(m, MonaAdapter)]
    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in adapters]
    with torch.no_grad():
        wrapped(pixel_values=pixels)
    for handle in handles:
        handle.remove()

    def forward(model: Any) -> None:
        model(pixel_values=pixels)

    def alone() -> None:
        for module, args, kwargs in calls:
            module(*args, **kwargs)

    variants = {
        "plain": lambda: forward(plain),
        "wrapped, adapters disabled": lambda: forward(wrapped),
        "mona": lambda: forward(wrapped),
        "mona modules alone": alone,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microsecond-scale work: keep OpenMP barriers (and other processes) out of it
    try:
        with torch.no_grad():  # the disabled wrapper's context is entered around its timed calls, outside the timer
            contexts = {"wrapped, adapters disabled": wrapped.disable_adapter}
            records = interleave(variants, rounds, inner, random.Random(seed), contexts)
    finally:
        torch.set_num_threads(threads)
    for record in records:
        record["us"] = record.pop("ms") * 1e3
    blocks = config.num_hidden_layers
    by_round: dict[int, dict[str, float]] = {}
    for x in records:
        by_round.setdefault(x["round"], {})[x["method"]] = x["us"]
    glue = [(row["mona"] - row["plain"] - row["mona modules alone"]) / blocks for row in by_round.values()]
    idle = [(row["wrapped, adapters disabled"] - row["plain"]) / blocks for row in by_round.values()]
    return {
        "model": f"tiny ViT, {blocks} blocks, hidden 32, 17 tokens, batch 1, no grad, 1 thread",
        "mona_modules_per_forward": len(calls),
        "us_per_forward": {name: per_method(records, "us")[name] for name in variants},
        "glue_us_per_block_call": describe(glue),
        "idle_wrapper_us_per_block_call": describe(idle),
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
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # main() also runs in-process (tests): leave the thread count as found


def _run(args: argparse.Namespace) -> dict[str, Any]:
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
    payload["module_fused"] = {
        "shape": shape,
        "iterations": iters,
        **module_breakdown(shape, iters, args.seed, fused=True),
    }
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
