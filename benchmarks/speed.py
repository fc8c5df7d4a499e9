"""Training-step time, peak memory and inference latency of Mona next to the frozen backbone, full fine-tuning and
LoRA, plus the depthwise filter alone (merged vs three convs); docs/benchmarks.md explains the method.

Methods: METHOD_LABELS (mona_twin: the A/A noise floor), each in a worker process of its own, one at a time, in
interleaved rounds; comparisons are medians of per-round ratios.

    python -m benchmarks.speed                 # ViT-B/16 and Swin-T at 224 px, batch 8, 32 (~30-35 min, 2 idle cores)
    python -m benchmarks.speed --baseline-rev d706065   # ... and the code of that revision as method mona_before
    python -m benchmarks.speed --quick         # tiny models, batch 2, two rounds (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import io
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import peft  # imported before forking so that the workers share it
import torch
import torch.nn.functional as F
import transformers  # noqa: F401
from torch.profiler import record_function

import mona_peft  # (registers the "mona" PEFT method; in mona_before's worker, the baseline revision's package)
from benchmarks import common

METHOD_LABELS = {
    "frozen": "frozen backbone", "full": "full fine-tuning", "lora": "LoRA r=16 q/v", "mona": "Mona (merged filter)",
    "mona_ref": "Mona, three separate convs (merge_filters=False)", "mona_twin": "Mona, second copy (A/A)",
    "mona_unfused": "Mona, plain-op norm + down (fused=False)",
    "mona_before": "Mona before (baseline revision)",  # the revision goes into the label at run time
    "mona_single": "Mona, 2 adapters, batch on one", "mona_mixed": "Mona, 2 adapters, mixed batch (half each)",
}  # fmt: skip
TRAIN_METHODS = ("full", "lora", "mona", "mona_ref", "mona_twin", "mona_unfused", "mona_before")
KINDS = ("train", "inference")
MIXED_ADAPTERS = ("first", "second")  # not "a"/"b": PEFT warns about names contained in the parameter prefix "mona_"
NUM_LABELS = 1000
STAT_KEYS = ("seconds", "cpu_seconds", "peak_mib", "step_mib", "cpu_util")
# "numerator/denominator" pairs reported as per-round ratios (when both methods ran).
TIME_PAIRS = {
    "train": ["mona/lora", "mona/full", "lora/full", "mona/mona_ref", "mona_twin/mona", "mona/mona_unfused",
              "mona_unfused/lora", "mona_unfused/full", "mona/mona_before", "mona_before/lora", "mona_before/full"],
    "inference": ["mona/frozen", "lora/frozen", "mona/mona_ref", "mona_twin/mona", "mona/mona_unfused",
                  "mona_unfused/frozen", "mona/mona_before", "mona_before/frozen", "mona_mixed/mona_single",
                  "mona_single/mona", "mona_mixed/frozen"],
}  # fmt: skip
MEMORY_PAIRS = [p for p in TIME_PAIRS["train"] if p not in ("mona_unfused/full", "mona_before/full")]


def rss_mib(field: str = "VmRSS") -> float:
    """RSS in MiB (``VmHWM``: its peak since reset); where /proc does not say, the lifetime peak (``ru_maxrss``)."""
    mib = common.proc_mib("/proc/self/status", field)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return mib if mib is not None else maxrss / (2**20 if sys.platform == "darwin" else 1024)


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # glibc's malloc_trim and mallopt, where there


def trim_heap() -> float:
    """Give free heap memory back to the OS (``malloc_trim(0)``; a no-op without glibc); the RSS after."""
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    return rss_mib()


def fix_allocator_policy() -> bool:
    """Fix glibc's thresholds, so that every worker allocates the same way whatever it ran before (False: not glibc).
    Left alone, glibc raises its mmap threshold as large blocks are freed (up to 32 MiB, where a long training process
    ends up) and trims the heap top past twice that: here the threshold is 32 MiB from the start, trimming off."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    fixed = hasattr(_LIBC, "mallopt") and _LIBC.mallopt(m_mmap_threshold, 32 * 2**20)
    return bool(fixed and _LIBC.mallopt(m_trim_threshold, 2**31 - 1))


class MethodBench:
    """One method on one model (here in a worker process of its own; profile_mona profiles its train step): builds it
    once, then measures train steps and inference. ``package_dir``: where mona_peft must come from (a baseline's)."""

    def __init__(self, model_key: str, method: str, threads: int, seed: int, package_dir: str | None) -> None:
        if package_dir and not Path(mona_peft.__file__).resolve().is_relative_to(Path(package_dir).resolve()):
            raise RuntimeError(f"{method} should run mona_peft from {package_dir}, got {mona_peft.__file__}")
        torch.set_num_threads(threads)
        self.spec, self.method, self.threads = common.MODELS[model_key], method, threads
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        torch.manual_seed(seed)
        model = common.build_classifier(self.spec, NUM_LABELS)
        two = method in ("mona_single", "mona_mixed")  # single: every sample on the first; mixed: half on each
        mona = common.mona_config(modules_to_save=[common.HEAD])
        if method == "frozen":
            model.requires_grad_(False)
        elif method == "lora":
            model = peft.get_peft_model(model, common.lora_config(model, modules_to_save=[common.HEAD]))
        elif method != "full":  # mona_before: the same call, in a worker whose mona_peft is the baseline's
            model = peft.get_peft_model(model, mona, adapter_name=MIXED_ADAPTERS[0] if two else "default")
        if two:
            model.add_adapter(MIXED_ADAPTERS[1], common.mona_config(modules_to_save=[common.HEAD]))
            model.set_adapter(MIXED_ADAPTERS[0])
        elif method in ("mona_unfused", "mona_ref"):
            mona_peft.set_compute(model, **{"fused" if method == "mona_unfused" else "merge_filters": False})
        self.model, self.trainable = model, [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None

    def info(self) -> dict[str, Any]:
        """Sizes, and how the Mona adapters compute (none for other methods, or a revision without MonaAdapter)."""
        adapters = [m for m in self.model.modules() if type(m).__name__ == "MonaAdapter"]
        trainable, total = common.count(self.trainable), common.count(self.model.parameters())
        info = {"trainable_params": trainable, "total_params": total, "rss_after_build_mib": rss_mib()}
        info |= {"mona_peft_file": mona_peft.__file__, "mona_adapters": len(adapters)}
        return info | {"mona_compute": sorted({f"fused={m.fused}, merge_filters={m.merge_filters}" for m in adapters})}

    def step(self, kind: str, batch: int) -> None:
        """A train step (forward, cross-entropy, backward, AdamW; ranges for profile_mona) or an inference forward."""
        if batch not in self.inputs:
            generator, size = torch.Generator().manual_seed(batch), self.spec.image_size
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            self.inputs[batch] = pixels, torch.randint(0, NUM_LABELS, (batch,), generator=generator)
        pixels, labels = self.inputs[batch]
        self.model.train(kind == "train")
        if kind == "train":
            with record_function("step: forward"):
                loss = F.cross_entropy(self.model(pixel_values=pixels).logits, labels)
            with record_function("step: backward"):
                loss.backward()
            with record_function("step: optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            return
        half = batch // 2  # mona_mixed: the first half of the batch on one adapter, the rest on the other
        routing = {"adapter_names": [MIXED_ADAPTERS[0]] * half + [MIXED_ADAPTERS[1]] * (batch - half)}
        with torch.inference_mode():
            self.model(pixel_values=pixels, **(routing if self.method == "mona_mixed" else {}))

    def measure(self, kind: str, batch: int, trim_before: bool, trim_after: bool) -> dict[str, Any]:
        """Time one :meth:`step` (wall, process CPU) and its peak RSS. ``trim_before``: give the free heap back first,
        so the peak is the step's own (else: the warm heap of a training loop); ``trim_after``: not to hold it idle."""
        if trim_before:
            trim_heap()
        before = rss_mib()
        with contextlib.suppress(OSError):  # reset VmHWM to the current RSS (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        cpu_start, start = time.process_time(), time.perf_counter()
        self.step(kind, batch)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = rss_mib("VmHWM")
        if trim_after:
            trim_heap()
        result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "cpu_util": cpu_seconds / (seconds * self.threads)}
        result |= {"peak_mib": peak, "step_mib": peak - before, "rss_before_mib": before, "rss_after_mib": rss_mib()}
        return result | {"heap": "trimmed" if trim_before else "steady"}


_BENCH: MethodBench | None = None  # the method a worker process holds


def in_worker(command: str, *args: Any) -> Any:
    """What a worker runs: ``start`` fixes the allocator policy and builds its :class:`MethodBench` (returns its info),
    ``measure`` calls it, ``release`` gives the free heap back to the OS (returns the RSS after)."""
    global _BENCH
    if command == "start":
        fixed = fix_allocator_policy()
        _BENCH = MethodBench(*args)
        return _BENCH.info() | {"allocator_policy_fixed": fixed}
    return trim_heap() if command == "release" else _BENCH.measure(*args)


def run_model(model_key: str, methods: list[str], batches: list[int], rounds: list[int], args: argparse.Namespace,
              ctx: Any, threads: int, baseline_src: str | None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """All measurements of one model (warm-up, then interleaved rounds per batch size): records, summarized configs."""
    rng, started, spec = random.Random(args.seed), time.perf_counter(), common.MODELS[model_key]
    kinds = {"train": [m for m in methods if m in TRAIN_METHODS], "inference": [m for m in methods if m != "full"]}
    with contextlib.ExitStack() as stack:  # one single-process pool per method, shut down on the way out
        workers, info = {}, {}
        for m in methods:  # the baseline's worker is spawned, with its src first on the sys.path it copies from here
            src = baseline_src if m == "mona_before" else None
            workers[m] = stack.enter_context(ProcessPoolExecutor(1, mp.get_context("spawn") if src else ctx))
            with mock.patch.object(sys, "path", ([src] if src else []) + sys.path):
                info[m] = workers[m].submit(in_worker, "start", model_key, m, threads, args.seed, src)
        info = {m: future.result() for m, future in info.items()}

        def ask(method: str, *command: Any) -> Any:
            return workers[method].submit(in_worker, *command).result()

        # Warm-up (lazy init, optimizer state, oneDNN primitives), from trimmed heaps: the peaks tell how much memory
        # each worker needs (base: RSS before a step), which decides below whether timed steps can run on warm heaps.
        needs: dict[str, dict[str, float]] = {}
        resident: dict[str, float] = {}  # what each worker holds now
        for m in methods:  # train last: its heap is the larger one to keep warm
            got = [ask(m, "measure", k, batches[0], True, False) for k in reversed(KINDS) if m in kinds[k]]
            needs[m] = {"base": min(g["rss_before_mib"] for g in got), "peak": max(g["peak_mib"] for g in got)}
            needs[m]["batch"] = batches[0]
            available, total = (common.proc_mib("/proc/meminfo", f"Mem{x}") for x in ("Available", "Total"))
            short = available is not None and total is not None and available < 0.3 * total  # else keep it warm
            resident[m] = ask(m, "release") if short else needs[m]["peak"]
        print(f"  {model_key}: workers ready and warm after {time.perf_counter() - started:.0f} s", flush=True)
        records, configs = [], []
        for batch, times in zip(batches, rounds, strict=True):
            config_start, load_before = time.perf_counter(), common.load_average()
            ref_off = args.ref_max_batch and batch > args.ref_max_batch
            active = [m for m in methods if not (ref_off and m == "mona_ref")]
            # Steady heaps when every worker can keep its peak at this batch size at once, trimmed heaps otherwise.
            grown = [n["peak"] + (n["peak"] - n["base"]) * (batch / n["batch"] - 1) for n in map(needs.get, active)]
            estimate = sum(grown)
            available = common.proc_mib("/proc/meminfo", "MemAvailable")
            total = (available or 0.0) + sum(resident.values())
            steady = available is not None and estimate < 0.8 * total
            if not steady:
                resident = {m: ask(m, "release") for m in methods}
            elif batch != batches[0]:  # let each heap grow to this batch size before timing (untimed)
                for m, kind in ((m, k) for m in active for k in KINDS if m in kinds[k]):
                    ask(m, "measure", kind, batch, False, False)
            heap = "steady" if steady else "trimmed"
            print(f"  {model_key} b{batch}: {heap} heaps, need ~{estimate:.0f} of {total:.0f} MiB", flush=True)
            mine = []  # this batch size's records
            for r in range(times):
                for kind in KINDS:
                    order = [m for m in kinds[kind] if m in active]
                    rng.shuffle(order)
                    for m in order:
                        got = ask(m, "measure", kind, batch, not steady, not steady)
                        mine.append({"model": model_key, "batch": batch, "kind": kind, "round": r, "method": m, **got})
                        need = needs[m]
                        need["peak"] = max(need["peak"] if need["batch"] == batch else 0.0, got["peak_mib"])
                        need["batch"], resident[m] = batch, got["rss_after_mib"]
                line = ", ".join(f"{x['method']}/{x['kind'][0]} {x['seconds']:.2f}s" for x in mine if x["round"] == r)
                print(f"  {model_key} b{batch} round {r + 1}/{times}: {line}", flush=True)
            records += mine
            config = {"model": model_key, "model_name": spec.name, "image_size": spec.image_size, "batch": batch}
            config |= {"rounds": times, "heap": heap, "memory_estimate_mib": estimate, "memory_available_mib": total}
            config |= {"load_average_before": load_before, "load_average_after": common.load_average()}
            seconds = round(time.perf_counter() - config_start, 1)
            config |= {"seconds": seconds, "workers": {m: info[m] for m in active}}
            configs.append(summarize_config(config, mine))
    return records, configs


def summarize_config(config: dict, records: list[dict]) -> dict:
    """``config`` with medians and spreads per method, and the paired ratios, of its ``records``."""
    out = dict(config)
    for kind in KINDS:
        rows = [r for r in records if r["kind"] == kind]
        stats = {key: common.per_method(rows, key) for key in STAT_KEYS}
        out[kind] = {m: {key: stats[key][m] for key in STAT_KEYS} for m in stats["seconds"]}
        out[f"{kind}_time_ratios"] = common.ratios(rows, TIME_PAIRS[kind], "seconds")
        out[f"{kind}_cpu_ratios"] = common.ratios(rows, TIME_PAIRS[kind], "cpu_seconds")
    train = [r for r in records if r["kind"] == "train"]
    steady = config["heap"] == "steady"  # then the step increment is ~0 by construction: no ratios of it
    out["train_step_memory_ratios"] = {} if steady else common.ratios(train, MEMORY_PAIRS, "step_mib")
    out["train_peak_ratios"] = common.ratios(train, MEMORY_PAIRS, "peak_mib")
    return out


def filter_benchmark(batch: int, bottleneck: int, grid: int, rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Merged vs three-conv filter at one shape (input and output gradient laid out as in the adapter:
    :func:`common.filter_input`), forward (no grad) and forward + backward, in interleaved rounds with an A/A twin;
    forward also with the kernel merged once (a kernel cache); forward + backward also with PyTorch's own conv
    backward for the merged conv (``conv2d``, what src ran before its custom backward)."""
    from mona_peft.filters import merged_filter, merged_filter_params, reference_filter

    torch.manual_seed(seed)
    image, weights, biases = common.filter_input(batch, bottleneck, grid)
    grad = common.filter_input(batch, bottleneck, grid)[0]  # the same channels-last view as the adapter's backward
    kernel, bias = (t.detach() for t in merged_filter_params(weights, biases))

    def cached(x: torch.Tensor, *_: Any) -> torch.Tensor:
        return F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2, groups=x.shape[1])

    def conv2d(x: torch.Tensor, weights: Any, biases: Any) -> torch.Tensor:
        merged, b = merged_filter_params(weights, biases)
        return F.conv2d(x, merged, b, padding=merged.shape[-1] // 2, groups=x.shape[1])

    def forward(fn: Any) -> None:
        with torch.no_grad():
            fn(image, weights, biases)

    def forward_backward(fn: Any) -> None:
        fn(image.detach().requires_grad_(True), weights, biases).backward(grad)
        for w in (*weights, *biases):
            w.grad = None

    results: dict[str, Any] = {"shape": {"batch": batch, "bottleneck": bottleneck, "height": grid, "width": grid}}
    results |= {"input_layout": "a channels-last view of the token tensor; the output gradient too", "rounds": rounds}
    results |= {"calls_per_measurement": inner, "measurement": "mean wall time of the calls (Timer.timeit)"}
    rng, variants = random.Random(seed), {"merged": merged_filter, "reference": reference_filter}
    for mode, run in (("forward", forward), ("forward_backward", forward_backward)):
        extra = {"cached": cached} if mode == "forward" else {"conv2d": conv2d}
        calls = {**variants, "merged_twin": merged_filter, **extra}
        records = common.interleave({k: functools.partial(run, fn) for k, fn in calls.items()}, rounds, inner, rng)
        found = common.ratios(records, ["reference/merged", "merged_twin/merged", "cached/merged", "conv2d/merged"])
        results[mode] = {"ms": common.per_method(records), "ratios": found}
    return results


def extract_baseline(rev: str, into: Path) -> dict[str, Any]:
    """Write ``src/`` as it was at git revision ``rev`` under ``into`` (``git archive``; the checkout is untouched) and
    describe it; the package is then importable from ``into / "src"``."""
    commit = common.git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subject, date = common.git("log", "-1", "--format=%s%n%cI", commit).split("\n", 1)
    archive = subprocess.check_output(["git", "archive", "--format=tar", commit, "src"], cwd=common.REPO)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    found = {"rev": rev, "commit": commit, "short": commit[:7], "subject": subject[:200], "date": date}
    how = "git archive of src/ into a temporary directory; the worker is a fresh interpreter with that directory first"
    return found | {"mona_peft_sha256": package_digest(into / "src" / "mona_peft"), "how": how + " on sys.path"}


def package_digest(package: Path) -> str:
    """SHA-256 over the package's Python files (relative path and content), to tell which code a result is of."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _target(name: str, scope: str, ratio: dict, threshold: float, noise: dict | None, kind: str = "max",
            cpu: dict | None = None) -> dict:  # fmt: skip
    """One target check: the median ratio against its threshold, ``within_noise`` when the A/A spread covers the gap;
    ``cpu``: the same comparison on process CPU time (less sensitive to contention)."""
    median = ratio["median"]
    met = median <= threshold if kind == "max" else median >= threshold
    entry = {"target": name, "scope": scope, "threshold": threshold, "kind": kind, "median": median}
    entry |= {"min": ratio["min"], "max": ratio["max"], "n": ratio["n"], "status": "met" if met else "missed"}
    if noise is not None:
        entry["aa_noise"] = floor = max(abs(noise["median"] - 1), (noise["max"] - noise["min"]) / 2)
        entry["within_noise"] = abs(median - threshold) <= floor
    if cpu is not None:
        entry |= {"cpu_median": cpu["median"], "cpu_min": cpu["min"], "cpu_max": cpu["max"]}
    return entry


def evaluate_targets(configs: list[dict], filter_result: dict, model: str, before: str = "before") -> list[dict]:
    """The issue's targets on the medians of the paired ratios (where measured): Mona's (and the baseline's, ``Mona
    <before>``) against LoRA, full FT and the frozen model on ``model``; Mona against the baseline; the filter."""
    goals = []  # (name, metric, ratio, threshold)
    for m, who in ("mona", "Mona"), ("mona_before", f"Mona {before}"):
        goals += [(f"{who} train step <= 1.05 x LoRA", "train", f"{m}/lora", 1.05),
                  (f"{who} train step <= 0.85 x full FT", "train", f"{m}/full", 0.85),
                  (f"{who} peak train memory <= 1.10 x LoRA", "memory", f"{m}/lora", 1.10),
                  (f"{who} inference <= 1.04 x frozen", "inference", f"{m}/frozen", 1.04)]  # fmt: skip
    regression, now = f"no regression: Mona / Mona {before}", "mona/mona_before"
    checks = [(f"{regression}, train step <= 1.00", "train", now, 1.0),
              (f"{regression}, peak train memory <= 1.00", "memory", now, 1.0),
              (f"{regression}, inference <= 1.00", "inference", now, 1.0),
              ("merged <= three-conv (train step)", "train", "mona/mona_ref", 1.0),
              ("merged <= three-conv (inference)", "inference", "mona/mona_ref", 1.0)]  # fmt: skip
    targets = []
    for s in configs:
        scope = f"{s['model_name']}, batch {s['batch']}"
        got = {kind: s[f"{kind}_time_ratios"] for kind in KINDS} | {"memory": s["train_peak_ratios"]}
        cpu = {kind: s[f"{kind}_cpu_ratios"] for kind in KINDS} | {"memory": {}}
        for name, metric, pair, threshold in (goals if s["model"] == model else []) + checks:
            if pair in got[metric]:
                aa, on_cpu = got[metric].get("mona_twin/mona"), cpu[metric].get(pair)
                targets.append(_target(name, scope, got[metric][pair], threshold, aa, "max", on_cpu))
    shape = filter_result["shape"]
    scope = f"filter alone, [{shape['batch']}, {shape['bottleneck']}, {shape['height']}, {shape['width']}]"
    for mode in ("forward", "forward_backward"):
        found = filter_result[mode]["ratios"]
        name = f"merged filter >= 1.3 x faster ({mode.replace('_', ' + ')})"
        targets.append(_target(name, scope, found["reference/merged"], 1.3, found["merged_twin/merged"], "min"))
    return targets


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``speed.json`` (``speed_quick.json`` with ``--quick``); returns what it wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, names = parser.add_argument, lambda text: [x for x in text.split(",") if x]
    add("--quick", action="store_true", help="tiny models, batch 2, two rounds, 1 thread (smoke test)")
    add("--models", type=names, default=None, help="comma-separated, default vit-b,swin-t")
    add("--methods", type=names, default=[m for m in METHOD_LABELS if m != "mona_before"], help="comma-separated")
    add("--batches", type=lambda t: list(map(int, names(t))), default=None, help="comma-separated, default 8,32")
    add("--rounds", type=lambda t: list(map(int, names(t))), default=None, help="per batch size, default 8,2")
    add("--threads", type=int, default=None, help="torch threads per worker (default: all cores; 1 with --quick)")
    add("--start-method", choices=("fork", "spawn"), help="default: fork on Linux, spawn with --baseline-rev")
    add("--baseline-rev", metavar="REV", help="also measure mona_before: Mona at this git revision (e.g. d706065)")
    add("--ref-max-batch", type=int, default=8, help="run mona_ref only up to this batch size (0: all; default 8)")
    add("--seed", type=int, default=0)
    add("--results-dir", type=Path, default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)

    models = args.models or (["tiny-vit", "tiny-swin"] if args.quick else ["vit-b", "swin-t"])
    batches = args.batches or ([2] if args.quick else [8, 32])
    rounds = args.rounds or ([2] * len(batches) if args.quick else [8, 2][: len(batches)] + [2] * (len(batches) - 2))
    methods = list(dict.fromkeys([*args.methods, *(["mona_before"] if args.baseline_rev else [])]))
    if len(rounds) != len(batches):
        parser.error("--rounds needs one value per batch size")
    if unknown := [m for m in methods if m not in METHOD_LABELS]:
        parser.error(f"unknown methods {unknown}; choose from {list(METHOD_LABELS)}")
    if "mona_before" in methods and not args.baseline_rev:
        parser.error("method mona_before needs --baseline-rev")
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    # fork shares the imports (fast start); with a baseline (a fresh interpreter) all spawn, to start on equal heaps
    fork = sys.platform == "linux" and not args.baseline_rev
    ctx = mp.get_context(args.start_method or ("fork" if fork else "spawn"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mona_baseline_") as scratch:
        baseline = extract_baseline(args.baseline_rev, Path(scratch)) if args.baseline_rev else None
        before = f"before ({baseline['short']})" if baseline else "before"
        labels = {m: METHOD_LABELS[m].replace("before (baseline revision)", before) for m in methods}
        mixed = "inference on a model with two Mona adapters: mona_single = the batch on the first (set_adapter), "
        mixed += "mona_mixed = model(pixel_values, adapter_names=[first half, second half])"
        current = {"git": common.git_revision(" + uncommitted changes in src/"), "mona_peft_file": mona_peft.__file__}
        current["mona_peft_sha256"] = package_digest(Path(mona_peft.__file__).parent)
        peak = "per-step peak RSS: VmHWM reset via /proc/self/clear_refs before the step, read after it"
        lifetime = "lifetime peak RSS (ru_maxrss): this OS does not allow resetting the peak; values are upper bounds"
        settings = {"models": models, "methods": methods, "method_labels": labels, "batches": batches,
                    "rounds": rounds, "threads_per_worker": threads, "start_method": ctx.get_start_method(),
                    "precision": "float32", "num_labels": NUM_LABELS,
                    "optimizer": "torch.optim.AdamW(lr=1e-4), defaults otherwise",
                    "memory_method": peak if os.access("/proc/self/clear_refs", os.W_OK) else lifetime,
                    "seed": args.seed, "ref_max_batch": args.ref_max_batch or None,
                    "mixed_batch": {"adapters": list(MIXED_ADAPTERS), "how": mixed}, "current_code": current,
                    "baseline": baseline}  # fmt: skip
        machine = {**common.machine_info(), "torch_threads": threads}
        payload = {"benchmark": "speed", "quick": args.quick, "machine": machine, "settings": settings}
        print(f"speed benchmark: {models} x batches {batches} x rounds {rounds}, methods {methods}", flush=True)
        records, configs = [], []
        for key in models:
            got, conf = run_model(key, methods, batches, rounds, args, ctx, threads, str(Path(scratch) / "src"))
            records, configs = records + got, configs + conf
    shape = dict(batch=4, bottleneck=8, grid=4, rounds=3, inner=3)
    shape = shape if args.quick else dict(batch=32, bottleneck=64, grid=14, rounds=15, inner=10)
    with ctx.Pool(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:  # the workers' thread count
        filter_result = pool.apply(filter_benchmark, (), {**shape, "seed": args.seed})
    target_model = "tiny-vit" if args.quick else "vit-b"
    payload |= {"configs": configs, "filter": filter_result}
    payload |= {"targets": evaluate_targets(configs, filter_result, target_model, before), "records": records}
    payload |= {"load_average_at_end": common.load_average(), "seconds": round(time.perf_counter() - started, 1)}
    path = common.write_results("speed_quick" if args.quick else "speed", payload, args.results_dir)
    for t in payload["targets"]:
        print(f"  {t['status']:6s} {t['target']} [{t['scope']}]: {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})")
    print(f"wrote {path} in {payload['seconds']} s", flush=True)
    return payload


if __name__ == "__main__":
    main()
