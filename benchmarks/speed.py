"""Training-step time, peak memory and inference latency of Mona next to the frozen backbone, full fine-tuning and
LoRA, all in one run; plus the depthwise filter alone (merged vs three convs).

Methods (``--methods``): ``frozen``, ``full``, ``lora``; ``mona`` (the package as it is, default compute);
``mona_twin`` (the same again: the A/A pair); ``mona_unfused`` and ``mona_ref``, the same model after
``mona_peft.set_compute(model, fused=False)`` (plain-op scaled norm + down projection) and
``set_compute(model, merge_filters=False)`` (three separate depthwise convs), the reference forms kept in the package;
``mona_single`` and ``mona_mixed``, inference only, a model with two Mona adapters: the batch on one of them
(``set_adapter``) and the same batch split half and half between them (``model(..., adapter_names=[...])``), the
cost of a mixed-adapter batch. ``--baseline-rev REV`` adds ``mona_before``: Mona as the package was at git revision
REV (its ``src/`` extracted with ``git archive`` into a temporary directory and imported by a worker started as a
fresh interpreter with that directory first on ``sys.path``), measured in the same interleaved rounds as the rest.

How it measures (so that a noisy, shared machine still gives comparable numbers):

* every method lives in its own worker process (forked once per model, after the imports; ``mona_before``'s is a
  fresh interpreter, since two versions of the package cannot share one process) and keeps its model,
  optimizer and inputs; the coordinator asks the workers for one measurement at a time, so only one runs at once;
* rounds are interleaved: in each round every method is measured once, in a fresh random order; results are reported
  as medians over rounds, and comparisons as the median of the per-round ratios (paired), with their min-max spread;
* an A/A pair, Mona in two independent workers (``mona`` and ``mona_twin``), shows the noise floor of every metric;
* a train step is forward + backward + ``AdamW.step()`` + ``zero_grad()``, in train mode (Mona's dropout on); inference
  is one forward in eval mode under ``torch.inference_mode()``; models are randomly initialised from their configs;
* every worker gets the same fixed glibc allocator thresholds (:func:`benchmarks.memory.fix_allocator_policy`), so
  none allocates differently because of what it ran before;
* timed steps run on a *steady* heap (left warm by the previous step, as in a training loop) whenever all workers
  can hold their peak memory at once; otherwise (large batches) each step starts from a *trimmed* heap and gives its
  memory back after, and then pays the page faults for everything it touches; the mode is recorded per config;
* peak memory is measured on the same steps, per process (see :mod:`benchmarks.memory`): with a steady heap it is
  the process's resident peak in a training loop, with a trimmed heap the step's own peak;
* each worker first runs one untimed warm-up train step and inference at the first batch size.

    python -m benchmarks.speed                 # ViT-B/16 and Swin-T at 224 px, batch 8, 32 (~30-35 min, 2 idle cores)
    python -m benchmarks.speed --baseline-rev d706065   # ... and the code of that revision as method mona_before
    python -m benchmarks.speed --quick         # tiny models, batch 2, two rounds (smoke test, seconds)
    python -m benchmarks.speed --device cuda   # bf16 autocast + torch.compile variants (untested: no GPU here)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import peft  # noqa: F401  (imported before forking so that the workers share it)
import torch
import torch.nn.functional as F
import transformers  # noqa: F401
from torch import nn

import mona_peft  # (registers the "mona" PEFT method; in mona_before's worker, the baseline revision's package)
from benchmarks import memory
from benchmarks.common import (
    HEAD,
    MODELS,
    REPO,
    build_classifier,
    load_average,
    lora_config,
    machine_info,
    mona_config,
    write_results,
)

METHOD_LABELS = {
    "frozen": "frozen backbone",
    "full": "full fine-tuning",
    "lora": "LoRA r=16 q/v",
    "mona": "Mona (merged filter)",
    "mona_ref": "Mona, three separate convs (merge_filters=False)",
    "mona_twin": "Mona, second copy (A/A)",
    "mona_unfused": "Mona, plain-op norm + down (fused=False)",
    "mona_before": "Mona before (baseline revision)",  # the revision is added to the label at run time
    "mona_single": "Mona, 2 adapters, batch on one",
    "mona_mixed": "Mona, 2 adapters, mixed batch (half each)",
}
TRAIN_METHODS = ("full", "lora", "mona", "mona_ref", "mona_twin", "mona_unfused", "mona_before")
INFERENCE_METHODS = (
    "frozen",
    "lora",
    "mona",
    "mona_ref",
    "mona_twin",
    "mona_unfused",
    "mona_before",
    "mona_single",
    "mona_mixed",
)
DEFAULT_METHODS = (
    "frozen",
    "full",
    "lora",
    "mona",
    "mona_ref",
    "mona_twin",
    "mona_unfused",
    "mona_single",
    "mona_mixed",
)
# The two adapters of mona_single / mona_mixed; the mixed batch is the first half on one, the second half on the other.
# (Not "a"/"b": PEFT warns about adapter names contained in the parameter prefix "mona_".)
MIXED_ADAPTERS = ("first", "second")
NUM_LABELS = 1000
STAT_KEYS = ("seconds", "cpu_seconds", "peak_mib", "step_mib", "cpu_util")

# (numerator, denominator) pairs reported as per-round ratios; a pair is skipped when a method was not run.
TIME_PAIRS = {
    "train": [
        ("mona", "lora"),
        ("mona", "full"),
        ("lora", "full"),
        ("mona", "mona_ref"),
        ("mona_twin", "mona"),
        ("mona", "mona_unfused"),
        ("mona_unfused", "lora"),
        ("mona_unfused", "full"),
        ("mona", "mona_before"),
        ("mona_before", "lora"),
        ("mona_before", "full"),
    ],
    "inference": [
        ("mona", "frozen"),
        ("lora", "frozen"),
        ("mona", "mona_ref"),
        ("mona_twin", "mona"),
        ("mona", "mona_unfused"),
        ("mona_unfused", "frozen"),
        ("mona", "mona_before"),
        ("mona_before", "frozen"),
        ("mona_mixed", "mona_single"),
        ("mona_single", "mona"),
        ("mona_mixed", "frozen"),
    ],
}
MEMORY_PAIRS = [
    ("mona", "lora"),
    ("mona", "full"),
    ("lora", "full"),
    ("mona", "mona_ref"),
    ("mona_twin", "mona"),
    ("mona", "mona_unfused"),
    ("mona_unfused", "lora"),
    ("mona", "mona_before"),
    ("mona_before", "lora"),
]


# ------------------------------------------------------------------------------------------------------ statistics


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and count of a sample."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
    }


def median_ms(fn: Any, calls: int) -> float:
    """Median wall time of ``calls`` calls of ``fn``, in ms (robust to the odd call preempted by another process)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paired_ratios(records: list[dict], numerator: str, denominator: str, key: str) -> dict[str, Any] | None:
    """Per-round ``key`` of ``numerator`` over ``denominator`` (same round), summarised."""
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        by_round.setdefault(r["round"], {})[r["method"]] = r[key]
    values = [
        row[numerator] / row[denominator]
        for _, row in sorted(by_round.items())
        if numerator in row and denominator in row and row[denominator] > 0
    ]
    if not values:
        return None
    return {**describe(values), "values": values}


# ---------------------------------------------------------------------------------------------------------- worker


class MethodBench:
    """One method on one model in a worker process: builds it once, then measures train steps and inference."""

    def __init__(self, model_key: str, method: str, device: str, seed: int) -> None:
        self.method = method
        base_method, _, variant = method.partition("+")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.spec = MODELS[model_key]
        torch.manual_seed(seed)
        model = build_classifier(self.spec, NUM_LABELS)
        if base_method == "frozen":
            model.requires_grad_(False)
        elif base_method == "lora":
            model = peft.get_peft_model(model, lora_config(model, modules_to_save=[HEAD]))
        elif base_method in ("mona_single", "mona_mixed"):
            first, second = MIXED_ADAPTERS
            model = peft.get_peft_model(model, mona_config(modules_to_save=[HEAD]), adapter_name=first)
            model.add_adapter(second, mona_config(modules_to_save=[HEAD]))
            model.set_adapter(first)  # mona_single runs every sample through it; mona_mixed routes per sample
        elif base_method.startswith("mona"):
            # mona_before: the same call, in a worker whose mona_peft is the baseline revision's
            model = peft.get_peft_model(model, mona_config(modules_to_save=[HEAD]))
            if base_method in ("mona_unfused", "mona_ref"):
                from mona_peft import set_compute

                if base_method == "mona_unfused":
                    set_compute(model, fused=False)
                else:
                    set_compute(model, merge_filters=False)
        elif base_method != "full":
            raise ValueError(f"unknown method {method!r}")
        self.mixed = base_method == "mona_mixed"
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        self.forward = torch.compile(self.model) if variant == "compile" else self.model
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def info(self) -> dict[str, Any]:
        # How the Mona adapters compute, read from the modules (none for the other methods; a baseline revision
        # without MonaAdapter reports none either).
        compute = sorted(
            {
                f"fused={m.fused}, merge_filters={m.merge_filters}"
                for m in self.model.modules()
                if type(m).__name__ == "MonaAdapter"
            }
        )
        return {
            "trainable_params": sum(p.numel() for p in self.trainable),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "rss_after_build_mib": memory.rss_mib(),
            "mona_peft_file": mona_peft.__file__,
            "mona_adapters": sum(type(m).__name__ == "MonaAdapter" for m in self.model.modules()),
            "mona_compute": compute,
        }

    def _adapter_names(self, batch: int) -> list[str] | None:
        """mona_mixed: the first half of the batch on one adapter, the rest on the other."""
        if not self.mixed:
            return None
        first, second = MIXED_ADAPTERS
        return [first] * (batch // 2) + [second] * (batch - batch // 2)

    def _batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch not in self.inputs:
            generator = torch.Generator().manual_seed(batch)
            size = self.spec.image_size
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator)
            self.inputs[batch] = (pixels.to(self.device), labels.to(self.device))
        return self.inputs[batch]

    def _autocast(self) -> Any:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _train_step(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.model.train()
        with self._autocast():
            logits = self.forward(pixel_values=pixels).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _inference(self, pixels: torch.Tensor) -> None:
        self.model.eval()
        names = self._adapter_names(pixels.shape[0])
        extra = {} if names is None else {"adapter_names": names}
        with torch.inference_mode(), self._autocast():
            self.forward(pixel_values=pixels, **extra)

    def measure(self, kind: str, batch: int, trim_before: bool, trim_after: bool) -> dict[str, Any]:
        """Time one train step or one inference and record its peak memory.

        ``trim_before``: give the free heap back to the OS first, so the peak RSS is the step's own (otherwise the
        step runs on the warm heap left by the previous one, as in a training loop); ``trim_after``: give it back
        after, so an idle worker does not sit on memory the others need.
        """
        pixels, labels = self._batch(batch)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            if trim_before:
                memory.trim_heap()
            before = memory.rss_mib()
            memory.reset_peak()
        cpu_start, start = time.process_time(), time.perf_counter()
        if kind == "train":
            self._train_step(pixels, labels)
        else:
            self._inference(pixels)
        if self.cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else memory.peak_rss_mib()
        if trim_after and not self.cuda:
            memory.trim_heap()
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "cpu_util": cpu_seconds / (seconds * torch.get_num_threads()),
            "peak_mib": peak,
            "step_mib": peak - before,
            "rss_before_mib": before,
            "rss_after_mib": memory.rss_mib() if not self.cuda else 0.0,
            "heap": "trimmed" if trim_before else "steady",
        }


def _worker_main(
    conn: Any, model_key: str, method: str, device: str, threads: int, seed: int, package_dir: str | None = None
) -> None:
    """Serve measurements of one method. ``package_dir``: the directory mona_peft must have been imported from (a
    baseline revision's ``src``), checked before anything is built."""
    try:
        if package_dir is not None and not Path(mona_peft.__file__).resolve().is_relative_to(
            Path(package_dir).resolve()
        ):
            raise RuntimeError(f"{method} should run mona_peft from {package_dir}, got {mona_peft.__file__}")
        torch.set_num_threads(threads)
        allocator_fixed = memory.fix_allocator_policy() if not device.startswith("cuda") else False
        bench = MethodBench(model_key, method, device, seed)
        conn.send({"ok": True, "info": {**bench.info(), "allocator_policy_fixed": allocator_fixed}})
        while (command := conn.recv()) is not None:
            if command[0] == "release":
                memory.trim_heap()
                conn.send({"ok": True, "rss_after_mib": memory.rss_mib()})
            else:
                _, kind, batch, trim_before, trim_after = command
                conn.send({"ok": True, **bench.measure(kind, batch, trim_before, trim_after)})
    except Exception:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


# A baseline worker is a fresh interpreter that puts the baseline's src first on sys.path before anything imports
# peft (whose import pulls in mona_peft through the package's start-up auto-registration) or mona_peft.
_BASELINE_BOOTSTRAP = """
import sys
fd, src, model_key, method, device, threads, seed = sys.argv[1:]
sys.path.insert(0, src)
from multiprocessing.connection import Connection
from benchmarks.speed import _worker_main
_worker_main(Connection(int(fd)), model_key, method, device, int(threads), int(seed), package_dir=src)
"""


class Worker:
    """Handle on a worker process that holds one method.

    ``baseline_src``: run the method on the mona_peft found in this directory (a baseline revision's ``src``), in a
    fresh interpreter (``subprocess``) rather than a ``multiprocessing`` child, whose imports come from this process.
    """

    def __init__(
        self,
        ctx: Any,
        model_key: str,
        method: str,
        device: str,
        threads: int,
        seed: int,
        baseline_src: str | None = None,
    ) -> None:
        self.method = method
        self.conn, child = ctx.Pipe()
        self.process: Any
        if baseline_src is None:
            self.process = ctx.Process(
                target=_worker_main, args=(child, model_key, method, device, threads, seed), daemon=True
            )
            self.process.start()
        else:
            fd = child.fileno()
            args = [str(fd), baseline_src, model_key, method, device, str(threads), str(seed)]
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BASELINE_BOOTSTRAP, *args], cwd=REPO, pass_fds=(fd,)
            )
        child.close()
        self.info: dict[str, Any] = {}

    def _receive(self) -> dict[str, Any]:
        reply = self.conn.recv()
        if not reply.pop("ok"):
            raise RuntimeError(f"worker {self.method!r} failed:\n{reply['error']}")
        return reply

    def ready(self) -> None:
        self.info = self._receive()["info"]

    def measure(self, kind: str, batch: int, trim: bool, keep_warm: bool = False) -> dict[str, Any]:
        """One measurement; ``trim``: from a trimmed heap, given back after unless ``keep_warm``."""
        self.conn.send(("measure", kind, batch, trim, trim and not keep_warm))
        return self._receive()

    def release(self) -> float:
        """Give the worker's free heap back to the OS; returns its RSS after."""
        self.conn.send(("release",))
        return self._receive()["rss_after_mib"]

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        if isinstance(self.process, subprocess.Popen):
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(timeout=30)
            return
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


# ----------------------------------------------------------------------------------------------------- coordinator


def run_model(
    model_key: str,
    methods: Sequence[str],
    batches: Sequence[int],
    rounds: Sequence[int],
    device: str,
    threads: int,
    seed: int,
    ctx: Any,
    ref_max_batch: int | None = None,
    baseline_src: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """All measurements of one model: warm-up, then interleaved rounds at each batch size.

    ``mona_ref`` is measured only at batch sizes up to ``ref_max_batch`` (all when None); ``mona_before`` runs the
    package found in ``baseline_src``.
    """
    rng = random.Random(seed)
    started = time.perf_counter()
    workers = {
        m: Worker(ctx, model_key, m, device, threads, seed, baseline_src if m.split("+")[0] == "mona_before" else None)
        for m in methods
    }
    try:
        for w in workers.values():
            w.ready()
        train = [m for m in methods if m.split("+")[0] in TRAIN_METHODS]
        infer = [m for m in methods if m.split("+")[0] in INFERENCE_METHODS]
        # Warm-up (lazy initialisation, optimizer state, oneDNN primitives), each step from a trimmed heap: its peak
        # tells how much memory the worker needs, which decides below whether timed steps can run on warm heaps.
        needs: dict[str, dict[str, float]] = {}
        resident: dict[str, float] = {}
        for m in methods:
            for kind in ("inference", "train"):  # train last: its heap is the larger one to keep warm
                if m in (train if kind == "train" else infer):
                    got = workers[m].measure(kind, batches[0], trim=True, keep_warm=True)
                    need = needs.setdefault(m, {"base": got["rss_before_mib"], "peak": 0.0, "batch": batches[0]})
                    need["base"] = min(need["base"], got["rss_before_mib"])
                    need["peak"] = max(need["peak"], got["peak_mib"])
            # keep the heap warm, unless memory is getting short
            resident[m] = workers[m].release() if _memory_short() else needs[m]["peak"]
        print(f"  {model_key}: workers ready and warm after {time.perf_counter() - started:.0f} s", flush=True)
        records, configs = [], []
        for batch, n_rounds in zip(batches, rounds, strict=True):
            config_start, load_before = time.perf_counter(), load_average()

            def active(m: str, batch: int = batch) -> bool:
                return not (m.startswith("mona_ref") and ref_max_batch is not None and batch > ref_max_batch)

            # Steady heaps when every worker can keep its peak at this batch size at once, trimmed heaps otherwise.
            estimate = sum(
                n["peak"] + (n["peak"] - n["base"]) * (batch / n["batch"] - 1) for m, n in needs.items() if active(m)
            )
            available = memory.available_mib()
            total = (available or 0.0) + sum(resident.values())
            steady = not device.startswith("cuda") and available is not None and estimate < 0.8 * total
            if not steady:
                resident = {m: workers[m].release() for m in methods}
            elif batch != batches[0]:
                for m in methods:  # let each heap grow to this batch size before timing (untimed)
                    for kind, names in (("train", train), ("inference", infer)):
                        if m in names and active(m):
                            workers[m].measure(kind, batch, trim=False)
            heap = "steady" if steady else "trimmed"
            print(
                f"  {model_key} b{batch}: {heap} heaps (workers need ~{estimate / 1024:.1f} GiB at once, "
                f"{total / 1024:.1f} GiB available)",
                flush=True,
            )
            for r in range(n_rounds):
                for kind, names in (("train", train), ("inference", infer)):
                    order = [m for m in names if active(m)]
                    rng.shuffle(order)
                    for m in order:
                        result = workers[m].measure(kind, batch, trim=not steady)
                        records.append({"model": model_key, "batch": batch, "kind": kind, "round": r, "method": m})
                        records[-1].update(result)
                        need = needs[m]
                        need["peak"] = max(need["peak"] if need["batch"] == batch else 0.0, result["peak_mib"])
                        need["batch"] = batch
                        resident[m] = result["rss_after_mib"]
                mine = [x for x in records if x["batch"] == batch and x["round"] == r and x["model"] == model_key]
                line = ", ".join(f"{x['method']}/{x['kind'][0]} {x['seconds']:.2f}s" for x in mine)
                print(f"  {model_key} b{batch} round {r + 1}/{n_rounds}: {line}", flush=True)
            configs.append(
                {
                    "model": model_key,
                    "model_name": MODELS[model_key].name,
                    "image_size": MODELS[model_key].image_size,
                    "batch": batch,
                    "rounds": n_rounds,
                    "heap": heap,
                    "memory_estimate_mib": estimate,
                    "memory_available_mib": total,
                    "load_average_before": load_before,
                    "load_average_after": load_average(),
                    "seconds": round(time.perf_counter() - config_start, 1),
                    "workers": {m: w.info for m, w in workers.items() if active(m)},
                }
            )
        return records, configs
    finally:
        for w in workers.values():
            w.stop()


def _memory_short(fraction: float = 0.3) -> bool:
    """Whether less than ``fraction`` of the machine's memory is still available."""
    available = memory.available_mib()
    from benchmarks.common import _total_memory_gib

    total = _total_memory_gib()
    return available is not None and total is not None and available < fraction * total * 1024


def summarize_config(config: dict, records: list[dict]) -> dict:
    """Medians and spreads per method, and the paired ratios, for one (model, batch)."""
    mine = [r for r in records if r["model"] == config["model"] and r["batch"] == config["batch"]]
    out = dict(config)
    for kind in ("train", "inference"):
        rows = [r for r in mine if r["kind"] == kind]
        out[kind] = {
            m: {key: describe([r[key] for r in rows if r["method"] == m]) for key in STAT_KEYS}
            for m in dict.fromkeys(r["method"] for r in rows)
        }
        for key, name in (("seconds", f"{kind}_time_ratios"), ("cpu_seconds", f"{kind}_cpu_ratios")):
            out[name] = {
                f"{num}/{den}": found
                for num, den in TIME_PAIRS[kind]
                if (found := paired_ratios(rows, num, den, key)) is not None
            }
    train_rows = [r for r in mine if r["kind"] == "train"]
    out["train_step_memory_ratios"] = {}  # with steady heaps the increment is ~0 by construction
    keys = (("peak_mib", "train_peak_ratios"), ("step_mib", "train_step_memory_ratios"))
    for key, name in keys if config.get("heap", "trimmed") == "trimmed" else keys[:1]:
        out[name] = {
            f"{num}/{den}": found
            for num, den in MEMORY_PAIRS
            if (found := paired_ratios(train_rows, num, den, key)) is not None
        }
    return out


# ----------------------------------------------------------------------------------------- the filter on its own


def filter_benchmark(batch: int, bottleneck: int, grid: int, rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Merged vs three-conv filter at one shape: forward (no grad) and forward + backward, interleaved rounds.

    The input is laid out exactly as ``MonaAdapter.forward`` hands it to the filter: the patch tokens of a
    [B, 1 + H*W, m] tensor, transposed to [B, m, H, W] (a channels-last view, no copy).
    """
    from mona_peft.filters import merged_filter, reference_filter

    torch.manual_seed(seed)
    tokens = torch.randn(batch, 1 + grid * grid, bottleneck)
    image = tokens[:, 1:].transpose(1, 2).reshape(batch, bottleneck, grid, grid)
    convs = [nn.Conv2d(bottleneck, bottleneck, k, padding=k // 2, groups=bottleneck) for k in (3, 5, 7)]
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    grad = torch.randn(batch, bottleneck, grid, grid)
    variants = {"merged": merged_filter, "reference": reference_filter, "merged_twin": merged_filter}

    def forward(fn: Any) -> None:
        with torch.no_grad():
            fn(image, weights, biases)

    def forward_backward(fn: Any) -> None:
        x = image.detach().requires_grad_(True)
        fn(x, weights, biases).backward(grad)
        for w in (*weights, *biases):
            w.grad = None

    results: dict[str, Any] = {
        "shape": {"batch": batch, "bottleneck": bottleneck, "height": grid, "width": grid},
        "input_layout": "channels-last view of the token tensor, as in MonaAdapter.forward",
        "rounds": rounds,
        "calls_per_measurement": inner,
        "measurement": "median of the calls' wall times",
    }
    rng = random.Random(seed)
    for mode, run in (("forward", forward), ("forward_backward", forward_backward)):
        for fn in variants.values():  # warm-up
            run(fn)
        records = []
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                records.append(
                    {
                        "round": r,
                        "method": name,
                        "ms": median_ms(lambda name=name, run=run: run(variants[name]), inner),
                    }
                )
        results[mode] = {
            "ms": {name: describe([x["ms"] for x in records if x["method"] == name]) for name in variants},
            "ratios": {
                "reference/merged": paired_ratios(records, "reference", "merged", "ms"),
                "merged_twin/merged": paired_ratios(records, "merged_twin", "merged", "ms"),
            },
        }
    return results


def _filter_worker(conn: Any, threads: int, kwargs: dict[str, Any]) -> None:
    try:
        torch.set_num_threads(threads)
        conn.send({"ok": True, "result": filter_benchmark(**kwargs)})
    except Exception:
        conn.send({"ok": False, "error": traceback.format_exc()})


def run_filter(ctx: Any, threads: int, **kwargs: Any) -> dict[str, Any]:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_filter_worker, args=(child, threads, kwargs), daemon=True)
    process.start()
    reply = parent.recv()
    process.join()
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return reply["result"]


# ------------------------------------------------------------------------------------------- the baseline's code


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _describe_head() -> str | None:
    """The checkout's commit, and whether ``src/`` differs from it (the code the ``mona`` methods run)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "src")
    except (OSError, RuntimeError):
        return None
    return head + (" + uncommitted changes in src/" if dirty else "")


def extract_baseline(rev: str, into: Path) -> dict[str, Any]:
    """Write ``src/`` as it was at git revision ``rev`` under ``into`` (``git archive``, nothing else in the checkout
    changes) and describe it; the package is then importable from ``into / "src"``."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subject, date = _git("log", "-1", "--format=%s%n%cI", commit).split("\n", 1)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {commit} src failed: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    src = into / "src"
    if not (src / "mona_peft" / "__init__.py").is_file():
        raise RuntimeError(f"revision {rev} ({commit[:7]}) has no src/mona_peft package")
    return {
        "rev": rev,
        "commit": commit,
        "short": commit[:7],
        "subject": subject[:200],
        "date": date,
        "mona_peft_sha256": package_digest(src / "mona_peft"),
        "how": "git archive of src/ into a temporary directory; the worker is a fresh interpreter with that "
        "directory first on sys.path",
    }


def package_digest(package: Path) -> str:
    """SHA-256 over the package's Python files (relative path and content), to tell which code a result is of."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- targets


def _target(
    name: str,
    scope: str,
    ratio: dict | None,
    threshold: float,
    noise: dict | None,
    kind: str,
    cpu_ratio: dict | None = None,
) -> dict:
    """One target check: the median ratio against its threshold; ``within_noise`` when the A/A spread covers the gap.

    ``cpu_ratio`` (the same comparison on process CPU time) is stored alongside as the less contention-sensitive view.
    """
    if ratio is None:
        return {"target": name, "scope": scope, "status": "not measured"}
    median = ratio["median"]
    met = median <= threshold if kind == "max" else median >= threshold
    entry = {
        "target": name,
        "scope": scope,
        "threshold": threshold,
        "kind": kind,
        "median": median,
        "min": ratio["min"],
        "max": ratio["max"],
        "n": ratio["n"],
        "status": "met" if met else "missed",
    }
    if noise is not None:
        floor = max(abs(noise["median"] - 1), (noise["max"] - noise["min"]) / 2)
        entry["aa_noise"] = floor
        entry["within_noise"] = abs(median - threshold) <= floor
    if cpu_ratio is not None:
        entry["cpu_median"] = cpu_ratio["median"]
        entry["cpu_min"], entry["cpu_max"] = cpu_ratio["min"], cpu_ratio["max"]
    return entry


def evaluate_targets(
    summaries: list[dict], filter_result: dict | None, target_model: str, before: str = "before"
) -> list[dict]:
    """The issue's targets, checked on the medians of the paired ratios: Mona's (and, with a baseline revision, the
    baseline's, labelled ``Mona <before>``) against LoRA, full fine-tuning and the frozen model on ``target_model``;
    no regression of Mona against the baseline on every model and batch; merged filter against three convs."""
    targets = []
    for s in summaries:
        scope = f"{s['model_name']}, batch {s['batch']}"
        tr, ir, mem = s["train_time_ratios"], s["inference_time_ratios"], s["train_peak_ratios"]
        tc, ic = s["train_cpu_ratios"], s["inference_cpu_ratios"]
        aa_train, aa_inf, aa_mem = tr.get("mona_twin/mona"), ir.get("mona_twin/mona"), mem.get("mona_twin/mona")
        for mona in ("mona", "mona_before"):
            if s["model"] != target_model or f"{mona}/lora" not in tr:
                continue
            label = "Mona" if mona == "mona" else f"Mona {before}"
            targets += [
                _target(
                    f"{label} train step <= 1.05 x LoRA",
                    scope,
                    tr.get(f"{mona}/lora"),
                    1.05,
                    aa_train,
                    "max",
                    tc.get(f"{mona}/lora"),
                ),
                _target(
                    f"{label} train step <= 0.85 x full FT",
                    scope,
                    tr.get(f"{mona}/full"),
                    0.85,
                    aa_train,
                    "max",
                    tc.get(f"{mona}/full"),
                ),
                _target(
                    f"{label} peak train memory <= 1.10 x LoRA", scope, mem.get(f"{mona}/lora"), 1.10, aa_mem, "max"
                ),
                _target(
                    f"{label} inference <= 1.04 x frozen",
                    scope,
                    ir.get(f"{mona}/frozen"),
                    1.04,
                    aa_inf,
                    "max",
                    ic.get(f"{mona}/frozen"),
                ),
            ]
        if "mona/mona_before" in tr:
            targets += [
                _target(
                    f"no regression: Mona / Mona {before}, train step <= 1.00",
                    scope,
                    tr.get("mona/mona_before"),
                    1.0,
                    aa_train,
                    "max",
                    tc.get("mona/mona_before"),
                ),
                _target(
                    f"no regression: Mona / Mona {before}, peak train memory <= 1.00",
                    scope,
                    mem.get("mona/mona_before"),
                    1.0,
                    aa_mem,
                    "max",
                ),
            ]
        if "mona/mona_before" in ir:
            targets.append(
                _target(
                    f"no regression: Mona / Mona {before}, inference <= 1.00",
                    scope,
                    ir.get("mona/mona_before"),
                    1.0,
                    aa_inf,
                    "max",
                    ic.get("mona/mona_before"),
                )
            )
        if "mona/mona_ref" in tr:
            targets += [
                _target(
                    "merged <= three-conv (train step)",
                    scope,
                    tr.get("mona/mona_ref"),
                    1.0,
                    aa_train,
                    "max",
                    tc.get("mona/mona_ref"),
                ),
                _target(
                    "merged <= three-conv (inference)",
                    scope,
                    ir.get("mona/mona_ref"),
                    1.0,
                    aa_inf,
                    "max",
                    ic.get("mona/mona_ref"),
                ),
            ]
    if filter_result is not None:
        shape = filter_result["shape"]
        scope = f"filter alone, [{shape['batch']}, {shape['bottleneck']}, {shape['height']}, {shape['width']}]"
        for mode in ("forward", "forward_backward"):
            ratios = filter_result[mode]["ratios"]
            targets.append(
                _target(
                    f"merged filter >= 1.3 x faster ({mode.replace('_', ' + ')})",
                    scope,
                    ratios["reference/merged"],
                    1.3,
                    ratios["merged_twin/merged"],
                    "min",
                )
            )
    return targets


# ------------------------------------------------------------------------------------------------------------ main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 2, two rounds, 1 thread (smoke test)")
    parser.add_argument("--models", type=_names, default=None, help="comma-separated, default vit-b,swin-t")
    parser.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS), help="comma-separated methods")
    parser.add_argument("--batches", type=_ints, default=None, help="comma-separated batch sizes, default 8,32")
    parser.add_argument("--rounds", type=_ints, default=None, help="rounds per batch size, default 8,2")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: bf16 autocast + torch.compile")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: all cores; 1 with --quick)"
    )
    parser.add_argument(
        "--start-method",
        choices=("fork", "spawn"),
        default=None,
        help="how workers start: fork (default on Linux CPU: shares the imports) needs a caller that has not run "
        "parallel torch ops yet (GNU OpenMP hangs in a forked child), which the command line guarantees; spawn "
        "(default with --baseline-rev, and on CUDA): every worker a fresh interpreter, as mona_before's must be, so "
        "that all start from the same memory",
    )
    parser.add_argument(
        "--baseline-rev",
        default=None,
        metavar="REV",
        help="also measure method mona_before: Mona as the package was at this git revision (e.g. d706065, the "
        "commit before the Mona layer v2 rewrite), in the same interleaved rounds",
    )
    parser.add_argument(
        "--ref-max-batch",
        type=int,
        default=8,
        help="run mona_ref only at batch sizes up to this (default 8; the filter alone is timed at batch 32 anyway); "
        "0 = every batch size",
    )
    parser.add_argument("--skip-filter", action="store_true", help="do not time the filter on its own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default speed, or speed_quick)")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)

    models = args.models or (["tiny-vit", "tiny-swin"] if args.quick else ["vit-b", "swin-t"])
    batches = args.batches or ([2] if args.quick else [8, 32])
    rounds = args.rounds or ([2] * len(batches) if args.quick else [8, 2][: len(batches)] + [2] * (len(batches) - 2))
    if len(rounds) != len(batches):
        parser.error("--rounds needs one value per batch size")
    methods = list(dict.fromkeys([*args.methods, *(["mona_before"] if args.baseline_rev else [])]))
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHOD_LABELS)}")
    if "mona_before" in methods and not args.baseline_rev:
        parser.error("method mona_before needs --baseline-rev")
    cuda = args.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
        if hasattr(torch, "compile"):
            methods += [f"{m}+compile" for m in methods if m != "mona_twin"]
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    # fork shares the imports (workers start in a second); CUDA cannot be forked, so it spawns. With a baseline,
    # whose worker must be a fresh interpreter, every worker is one, so that none starts with a different heap.
    fork = not cuda and sys.platform == "linux" and not args.baseline_rev
    ctx = mp.get_context(args.start_method or ("fork" if fork else "spawn"))

    with tempfile.TemporaryDirectory(prefix="mona_baseline_") as scratch:
        baseline = extract_baseline(args.baseline_rev, Path(scratch)) if args.baseline_rev else None
        return _run(args, models, batches, rounds, methods, threads, ctx, cuda, baseline, Path(scratch) / "src")


def _run(
    args: argparse.Namespace,
    models: list[str],
    batches: list[int],
    rounds: list[int],
    methods: list[str],
    threads: int,
    ctx: Any,
    cuda: bool,
    baseline: dict[str, Any] | None,
    baseline_src: Path,
) -> dict[str, Any]:
    started = time.perf_counter()
    labels = {m: METHOD_LABELS[m.split("+")[0]] + (" + compile" if "+" in m else "") for m in methods}
    before = f"before ({baseline['short']})" if baseline else "before"
    for m in methods:
        if m.split("+")[0] == "mona_before":
            labels[m] = labels[m].replace("before (baseline revision)", before)
    payload: dict[str, Any] = {
        "benchmark": "speed",
        "quick": args.quick,
        "machine": {**machine_info(args.device), "torch_threads": threads},
        "settings": {
            "models": models,
            "methods": methods,
            "method_labels": labels,
            "batches": batches,
            "rounds": rounds,
            "threads_per_worker": threads,
            "start_method": ctx.get_start_method(),
            "precision": "bf16 autocast" if cuda else "float32",
            "num_labels": NUM_LABELS,
            "optimizer": "torch.optim.AdamW(lr=1e-4), defaults otherwise",
            "memory_method": "torch.cuda.max_memory_allocated per step" if cuda else memory.method_description(),
            "seed": args.seed,
            "ref_max_batch": args.ref_max_batch or None,
            "mixed_batch": {
                "adapters": list(MIXED_ADAPTERS),
                "how": "inference on a model with two Mona adapters: mona_single = the batch on the first "
                "(set_adapter), mona_mixed = model(pixel_values, adapter_names=[first half, second half])",
            },
            "current_code": {
                "git": _describe_head(),
                "mona_peft_file": mona_peft.__file__,
                "mona_peft_sha256": package_digest(Path(mona_peft.__file__).parent),
            },
            "baseline": baseline,
        },
    }
    print(f"speed benchmark: {models} x batches {batches} x rounds {rounds}, methods {methods}", flush=True)
    load = load_average()
    if not cuda and threads > 1 and load and load[0] > (os.cpu_count() or 1):
        print(
            f"  warning: load average {load[0]:.1f} exceeds the {os.cpu_count()} cores; with {threads} threads per "
            "worker every parallel op waits for descheduled threads. Consider --threads 1 on a shared machine.",
            flush=True,
        )
    records: list[dict] = []
    configs: list[dict] = []
    for key in models:
        got, conf = run_model(
            key,
            methods,
            batches,
            rounds,
            args.device,
            threads,
            args.seed,
            ctx,
            args.ref_max_batch or None,
            str(baseline_src) if baseline else None,
        )
        records += got
        configs += conf
    summaries = [summarize_config(c, records) for c in configs]
    filter_result = None
    if not args.skip_filter:
        shape = (
            dict(batch=4, bottleneck=8, grid=4, rounds=3, inner=3)
            if args.quick
            else dict(batch=32, bottleneck=64, grid=14, rounds=15, inner=10)
        )
        filter_result = run_filter(ctx, threads, seed=args.seed, **shape)
    payload.update(
        {
            "configs": summaries,
            "filter": filter_result,
            "targets": evaluate_targets(summaries, filter_result, "tiny-vit" if args.quick else "vit-b", before),
            "records": records,
            "load_average_at_end": load_average(),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    name = args.name or ("speed_quick" if args.quick else "speed")
    path = write_results(name, payload, args.results_dir)
    for t in payload["targets"]:
        if "median" in t:
            spread = f"{t['min']:.3f}-{t['max']:.3f}"
            print(f"  {t['status']:6s} {t['target']} [{t['scope']}]: {t['median']:.3f} ({spread})")
    print(f"wrote {path} in {payload['seconds']} s", flush=True)
    return payload


if __name__ == "__main__":
    main()
