"""Training-step time, peak memory and inference latency of Mona next to the frozen backbone, full fine-tuning and
LoRA, in one run; plus the depthwise filter alone (merged vs three convs). docs/benchmarks.md explains the method.

Methods: frozen, full, lora; mona (the package as it is); mona_twin (the same again: the A/A pair, the noise floor);
mona_unfused / mona_ref (after ``set_compute(model, fused=False)`` / ``set_compute(model, merge_filters=False)``);
mona_single / mona_mixed (inference on a model with two adapters: the batch on one, or split half and half with
``adapter_names``); mona_before (``--baseline-rev REV``: ``src/`` of that revision, extracted with ``git archive``,
in a worker that is a fresh interpreter). Every method lives in its own worker process; one worker runs at a time, in
interleaved rounds (every method once per round, in a fresh random order); comparisons are medians of per-round
ratios. Each worker gets the same fixed glibc allocator thresholds; timed steps run on steady (warm) heaps when all
workers fit in memory at once, else on trimmed ones.

    python -m benchmarks.speed                 # ViT-B/16 and Swin-T at 224 px, batch 8, 32 (~30-35 min, 2 idle cores)
    python -m benchmarks.speed --baseline-rev d706065   # ... and the code of that revision as method mona_before
    python -m benchmarks.speed --quick         # tiny models, batch 2, two rounds (smoke test)
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
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import peft  # imported before forking so that the workers share it
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
    git,
    git_revision,
    interleave,
    load_average,
    lora_config,
    machine_info,
    mona_config,
    per_method,
    ratios,
    total_memory_gib,
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
    "mona_before": "Mona before (baseline revision)",  # the revision goes into the label at run time
    "mona_single": "Mona, 2 adapters, batch on one",
    "mona_mixed": "Mona, 2 adapters, mixed batch (half each)",
}
TRAIN_METHODS = ("full", "lora", "mona", "mona_ref", "mona_twin", "mona_unfused", "mona_before")
INFERENCE_METHODS = tuple(m for m in METHOD_LABELS if m != "full")
# Not "a"/"b": PEFT warns about adapter names contained in the parameter prefix "mona_".
MIXED_ADAPTERS = ("first", "second")
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
MEMORY_PAIRS = "mona/lora mona/full lora/full mona/mona_ref mona_twin/mona mona/mona_unfused mona_unfused/lora "
MEMORY_PAIRS = (MEMORY_PAIRS + "mona/mona_before mona_before/lora").split()

# ---------------------------------------------------------------------------------------------------------- worker


class MethodBench:
    """One method on one model in a worker process: builds it once, then measures train steps and inference."""

    def __init__(self, model_key: str, method: str, device: str, seed: int) -> None:
        base, _, variant = method.partition("+")
        self.device, self.spec, self.mixed = torch.device(device), MODELS[model_key], base == "mona_mixed"
        torch.manual_seed(seed)
        model = build_classifier(self.spec, NUM_LABELS)
        if base not in ("full", "frozen", "lora") and not base.startswith("mona"):
            raise ValueError(f"unknown method {method!r}")
        if base == "frozen":
            model.requires_grad_(False)
        elif base == "lora":
            model = peft.get_peft_model(model, lora_config(model, modules_to_save=[HEAD]))
        elif base in ("mona_single", "mona_mixed"):  # single: every sample on the first; mixed: routed per sample
            model = peft.get_peft_model(model, mona_config(modules_to_save=[HEAD]), adapter_name=MIXED_ADAPTERS[0])
            model.add_adapter(MIXED_ADAPTERS[1], mona_config(modules_to_save=[HEAD]))
            model.set_adapter(MIXED_ADAPTERS[0])
        elif base != "full":  # mona_before: the same call, in a worker whose mona_peft is the baseline's
            model = peft.get_peft_model(model, mona_config(modules_to_save=[HEAD]))
            if base in ("mona_unfused", "mona_ref"):
                mona_peft.set_compute(model, **{"fused" if base == "mona_unfused" else "merge_filters": False})
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        self.forward = torch.compile(self.model) if variant == "compile" else self.model
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def info(self) -> dict[str, Any]:
        """Sizes, and how the Mona adapters compute, read from the modules (none for other methods, or a baseline
        revision without MonaAdapter)."""
        adapters = [m for m in self.model.modules() if type(m).__name__ == "MonaAdapter"]
        info = {"trainable_params": sum(p.numel() for p in self.trainable)}
        info |= {
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "rss_after_build_mib": memory.rss_mib(),
        }
        computes = {f"fused={m.fused}, merge_filters={m.merge_filters}" for m in adapters}
        return info | {
            "mona_peft_file": mona_peft.__file__,
            "mona_adapters": len(adapters),
            "mona_compute": sorted(computes),
        }

    def _run(self, kind: str, batch: int) -> None:
        if batch not in self.inputs:
            generator, size = torch.Generator().manual_seed(batch), self.spec.image_size
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator)
            self.inputs[batch] = (pixels.to(self.device), labels.to(self.device))
        pixels, labels = self.inputs[batch]
        cuda = self.device.type == "cuda"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda)
        self.model.train(kind == "train")
        if kind == "train":
            with autocast:
                logits = self.forward(pixel_values=pixels).logits
            F.cross_entropy(logits.float(), labels).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        half = batch // 2  # mona_mixed: the first half of the batch on one adapter, the rest on the other
        extra = {"adapter_names": [MIXED_ADAPTERS[0]] * half + [MIXED_ADAPTERS[1]] * (batch - half)}
        with torch.inference_mode(), autocast:
            self.forward(pixel_values=pixels, **(extra if self.mixed else {}))

    def measure(self, kind: str, batch: int, trim_before: bool, trim_after: bool) -> dict[str, Any]:
        """Time one train step or inference and record its peak memory. ``trim_before``: give the free heap back to
        the OS first, so the peak is the step's own (else the step runs on the warm heap the previous one left, as in
        a training loop); ``trim_after``: give it back after, so an idle worker does not hold memory others need."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif trim_before:
            memory.trim_heap()
        before = torch.cuda.memory_allocated() / 2**20 if cuda else memory.rss_mib()
        if not cuda:
            memory.reset_peak()
        cpu_start, start = time.process_time(), time.perf_counter()
        self._run(kind, batch)
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else memory.peak_rss_mib()
        if trim_after and not cuda:
            memory.trim_heap()
        result = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "cpu_util": cpu_seconds / (seconds * torch.get_num_threads()),
        }
        result |= {"peak_mib": peak, "step_mib": peak - before, "rss_before_mib": before}
        return result | {
            "rss_after_mib": 0.0 if cuda else memory.rss_mib(),
            "heap": "trimmed" if trim_before else "steady",
        }


def _worker_main(conn: Any, model_key: str, method: str, device: str, threads: int, seed: int,
                 package_dir: str | None = None) -> None:  # fmt: skip
    """Serve measurements of one method. ``package_dir``: where mona_peft must come from (a baseline's ``src``)."""
    try:
        if package_dir and not Path(mona_peft.__file__).resolve().is_relative_to(Path(package_dir).resolve()):
            raise RuntimeError(f"{method} should run mona_peft from {package_dir}, got {mona_peft.__file__}")
        torch.set_num_threads(threads)
        allocator_fixed = not device.startswith("cuda") and memory.fix_allocator_policy()
        bench = MethodBench(model_key, method, device, seed)
        conn.send({"ok": True, "info": {**bench.info(), "allocator_policy_fixed": allocator_fixed}})
        while (command := conn.recv()) is not None:
            if command[0] == "release":
                memory.trim_heap()
                conn.send({"ok": True, "rss_after_mib": memory.rss_mib()})
            else:
                conn.send({"ok": True, **bench.measure(*command[1:])})
    except Exception:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


# A baseline worker is a fresh interpreter that puts the baseline's src first on sys.path before anything imports
# peft (whose import pulls in mona_peft through the package's auto-registration) or mona_peft.
_BASELINE_BOOTSTRAP = """
import sys
fd, src, model_key, method, device, threads, seed = sys.argv[1:]
sys.path.insert(0, src)
from multiprocessing.connection import Connection
from benchmarks.speed import _worker_main
_worker_main(Connection(int(fd)), model_key, method, device, int(threads), int(seed), package_dir=src)
"""


class Worker:
    """Handle on the process that holds one method: a ``multiprocessing`` child, or with ``baseline_src`` a fresh
    interpreter running the mona_peft of that directory (a child would share this process's imports)."""

    def __init__(self, ctx: Any, method: str, args: tuple, baseline_src: str | None = None) -> None:
        self.method, self.info = method, {}
        self.conn, child = ctx.Pipe()
        if baseline_src is None:
            self.process = ctx.Process(target=_worker_main, args=(child, *args), daemon=True)
            self.process.start()
        else:
            argv = [sys.executable, "-c", _BASELINE_BOOTSTRAP, str(child.fileno()), baseline_src, *map(str, args)]
            self.process = subprocess.Popen(argv, cwd=REPO, pass_fds=(child.fileno(),))
        child.close()

    def ask(self, *command: Any) -> dict[str, Any]:
        """Send ``command`` (none: wait for the start-up report) and return the reply, or raise the worker's error."""
        if command:
            self.conn.send(command)
        reply = self.conn.recv()
        if not reply.pop("ok"):
            raise RuntimeError(f"worker {self.method!r} failed:\n{reply['error']}")
        return reply

    def measure(self, kind: str, batch: int, trim: bool, keep_warm: bool = False) -> dict[str, Any]:
        """One measurement; ``trim``: from a trimmed heap, given back after unless ``keep_warm``."""
        return self.ask("measure", kind, batch, trim, trim and not keep_warm)

    def release(self) -> float:
        """Give the worker's free heap back to the OS; returns its RSS after."""
        return self.ask("release")["rss_after_mib"]

    def stop(self) -> None:
        """Ask the worker to end, and end it if it does not within 30 s."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        wait = self.process.wait if isinstance(self.process, subprocess.Popen) else self.process.join
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait(timeout=30)
        self.process.terminate()  # a no-op once it has ended


# ----------------------------------------------------------------------------------------------------- coordinator


def run_model(model_key: str, methods: list[str], batches: list[int], rounds: list[int], args: argparse.Namespace,
              ctx: Any, threads: int, baseline_src: str | None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """All measurements of one model: warm-up, then interleaved rounds at each batch size (``mona_ref`` only up to
    ``args.ref_max_batch``, unless 0)."""
    rng, started = random.Random(args.seed), time.perf_counter()
    spec = (model_key, args.device, threads, args.seed)
    workers = {
        m: Worker(ctx, m, (spec[0], m, *spec[1:]), baseline_src if "mona_before" in m else None) for m in methods
    }
    kinds = {kind: [m for m in methods if m.split("+")[0] in names]
             for kind, names in (("train", TRAIN_METHODS), ("inference", INFERENCE_METHODS))}  # fmt: skip
    try:
        for w in workers.values():
            w.info = w.ask()["info"]
        # Warm-up (lazy init, optimizer state, oneDNN primitives), from trimmed heaps: the peaks tell how much memory
        # each worker needs, which decides below whether timed steps can run on warm heaps.
        needs: dict[str, dict[str, float]] = {}
        resident: dict[str, float] = {}
        for m in methods:
            for kind in ("inference", "train"):  # train last: its heap is the larger one to keep warm
                if m in kinds[kind]:
                    got = workers[m].measure(kind, batches[0], trim=True, keep_warm=True)
                    need = needs.setdefault(m, {"base": got["rss_before_mib"], "peak": 0.0, "batch": batches[0]})
                    need["base"], need["peak"] = (
                        min(need["base"], got["rss_before_mib"]),
                        max(need["peak"], got["peak_mib"]),
                    )
            available, total = memory.available_mib(), total_memory_gib()  # keep the heap warm unless memory is short
            short = available is not None and total is not None and available < 0.3 * total * 1024
            resident[m] = workers[m].release() if short else needs[m]["peak"]
        print(f"  {model_key}: workers ready and warm after {time.perf_counter() - started:.0f} s", flush=True)
        records, configs = [], []
        for batch, n_rounds in zip(batches, rounds, strict=True):
            config_start, load_before = time.perf_counter(), load_average()
            ref_off = args.ref_max_batch and batch > args.ref_max_batch
            active = [m for m in methods if not (ref_off and m.startswith("mona_ref"))]
            # Steady heaps when every worker can keep its peak at this batch size at once, trimmed heaps otherwise.
            scale = {m: batch / n["batch"] - 1 for m, n in needs.items()}
            estimate = sum(n["peak"] + (n["peak"] - n["base"]) * scale[m] for m, n in needs.items() if m in active)
            available = memory.available_mib()
            total = (available or 0.0) + sum(resident.values())
            steady = not args.device.startswith("cuda") and available is not None and estimate < 0.8 * total
            if not steady:
                resident = {m: workers[m].release() for m in methods}
            elif batch != batches[0]:  # let each heap grow to this batch size before timing (untimed)
                for m, kind in ((m, k) for m in active for k in ("train", "inference") if m in kinds[k]):
                    workers[m].measure(kind, batch, trim=False)
            heap = "steady" if steady else "trimmed"
            print(f"  {model_key} b{batch}: {heap} heaps (workers need ~{estimate / 1024:.1f} GiB at once, "
                  f"{total / 1024:.1f} GiB available)", flush=True)  # fmt: skip
            for r in range(n_rounds):
                mine = []
                for kind in ("train", "inference"):
                    order = [m for m in kinds[kind] if m in active]
                    rng.shuffle(order)
                    for m in order:
                        result = workers[m].measure(kind, batch, trim=not steady)
                        mine.append(
                            {"model": model_key, "batch": batch, "kind": kind, "round": r, "method": m, **result}
                        )
                        need = needs[m]
                        need["peak"] = max(need["peak"] if need["batch"] == batch else 0.0, result["peak_mib"])
                        need["batch"], resident[m] = batch, result["rss_after_mib"]
                records += mine
                line = ", ".join(f"{x['method']}/{x['kind'][0]} {x['seconds']:.2f}s" for x in mine)
                print(f"  {model_key} b{batch} round {r + 1}/{n_rounds}: {line}", flush=True)
            config = {
                "model": model_key,
                "model_name": MODELS[model_key].name,
                "image_size": MODELS[model_key].image_size,
            }
            config |= {"batch": batch, "rounds": n_rounds, "heap": heap, "memory_estimate_mib": estimate}
            config |= {
                "memory_available_mib": total,
                "load_average_before": load_before,
                "load_average_after": load_average(),
            }
            config |= {
                "seconds": round(time.perf_counter() - config_start, 1),
                "workers": {m: workers[m].info for m in active},
            }
            configs.append(config)
        return records, configs
    finally:
        for w in workers.values():
            w.stop()


def summarize_config(config: dict, records: list[dict]) -> dict:
    """Medians and spreads per method, and the paired ratios, for one (model, batch)."""
    mine = [r for r in records if r["model"] == config["model"] and r["batch"] == config["batch"]]
    out = dict(config)
    for kind in ("train", "inference"):
        rows = [r for r in mine if r["kind"] == kind]
        stats = {key: per_method(rows, key) for key in STAT_KEYS}
        out[kind] = {m: {key: stats[key][m] for key in STAT_KEYS} for m in stats["seconds"]}
        out[f"{kind}_time_ratios"] = ratios(rows, TIME_PAIRS[kind], "seconds")
        out[f"{kind}_cpu_ratios"] = ratios(rows, TIME_PAIRS[kind], "cpu_seconds")
    train = [r for r in mine if r["kind"] == "train"]
    # with steady heaps the step increment is ~0 by construction: no ratios of it
    trimmed = config.get("heap", "trimmed") == "trimmed"
    out["train_step_memory_ratios"] = ratios(train, MEMORY_PAIRS, "step_mib") if trimmed else {}
    out["train_peak_ratios"] = ratios(train, MEMORY_PAIRS, "peak_mib")
    return out


def filter_benchmark(batch: int, bottleneck: int, grid: int, rounds: int, inner: int, seed: int) -> dict[str, Any]:
    """Merged vs three-conv filter at one shape, forward (no grad) and forward + backward, in interleaved rounds with
    an A/A twin. The input is laid out as ``MonaAdapter.forward`` hands it over: the patch tokens of a [B, 1 + H*W, m]
    tensor, transposed to [B, m, H, W] (a channels-last view)."""
    from mona_peft.filters import merged_filter, reference_filter

    torch.manual_seed(seed)
    image = (
        torch.randn(batch, 1 + grid * grid, bottleneck)[:, 1:].transpose(1, 2).reshape(batch, bottleneck, grid, grid)
    )
    convs = [nn.Conv2d(bottleneck, bottleneck, k, padding=k // 2, groups=bottleneck) for k in (3, 5, 7)]
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    grad = torch.randn(batch, bottleneck, grid, grid)

    def forward(fn: Any) -> None:
        with torch.no_grad():
            fn(image, weights, biases)

    def forward_backward(fn: Any) -> None:
        fn(image.detach().requires_grad_(True), weights, biases).backward(grad)
        for w in (*weights, *biases):
            w.grad = None

    results: dict[str, Any] = {"shape": {"batch": batch, "bottleneck": bottleneck, "height": grid, "width": grid}}
    results |= {"input_layout": "channels-last view of the token tensor, as in MonaAdapter.forward", "rounds": rounds}
    results |= {
        "calls_per_measurement": inner,
        "measurement": "mean wall time of the calls (torch.utils.benchmark.Timer)",
    }
    rng = random.Random(seed)
    for mode, run in (("forward", forward), ("forward_backward", forward_backward)):
        variants = {"merged": merged_filter, "reference": reference_filter, "merged_twin": merged_filter}
        records = interleave(
            {name: (lambda fn=fn, run=run: run(fn)) for name, fn in variants.items()}, rounds, inner, rng
        )
        results[mode] = {
            "ms": per_method(records),
            "ratios": ratios(records, ["reference/merged", "merged_twin/merged"]),
        }
    return results


# ------------------------------------------------------------------------------------------- the baseline's code


def extract_baseline(rev: str, into: Path) -> dict[str, Any]:
    """Write ``src/`` as it was at git revision ``rev`` under ``into`` (``git archive``; the checkout is untouched) and
    describe it; the package is then importable from ``into / "src"``."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subject, date = git("log", "-1", "--format=%s%n%cI", commit).split("\n", 1)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {commit} src failed: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    if not (into / "src" / "mona_peft" / "__init__.py").is_file():
        raise RuntimeError(f"revision {rev} ({commit[:7]}) has no src/mona_peft package")
    found = {"rev": rev, "commit": commit, "short": commit[:7], "subject": subject[:200], "date": date}
    how = (
        "git archive of src/ into a temporary directory; the worker is a fresh interpreter with that directory first "
    )
    return found | {"mona_peft_sha256": package_digest(into / "src" / "mona_peft"), "how": how + "on sys.path"}


def package_digest(package: Path) -> str:
    """SHA-256 over the package's Python files (relative path and content), to tell which code a result is of."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- targets


def _target(name: str, scope: str, ratio: dict | None, threshold: float, noise: dict | None, kind: str = "max",
            cpu: dict | None = None) -> dict:  # fmt: skip
    """One target check: the median ratio against its threshold, ``within_noise`` when the A/A spread covers the gap;
    ``cpu``: the same comparison on process CPU time (less sensitive to contention)."""
    if ratio is None:
        return {"target": name, "scope": scope, "status": "not measured"}
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


def evaluate_targets(summaries: list[dict], filter_result: dict | None, target_model: str, before: str = "before"
                     ) -> list[dict]:  # fmt: skip
    """The issue's targets on the medians of the paired ratios: Mona's (and the baseline's, ``Mona <before>``)
    against LoRA, full fine-tuning and the frozen model on ``target_model``; no regression of Mona against the
    baseline on every model and batch; merged filter against three convs."""
    targets = []
    for s in summaries:
        scope = f"{s['model_name']}, batch {s['batch']}"
        measured = {
            "train": s["train_time_ratios"],
            "inference": s["inference_time_ratios"],
            "memory": s["train_peak_ratios"],
        }
        cpu = {"train": s["train_cpu_ratios"], "inference": s["inference_cpu_ratios"], "memory": {}}
        groups = []  # (the ratio whose presence turns the group on, its checks: name, metric, ratio, threshold)
        for mona, label in (("mona", "Mona"), ("mona_before", f"Mona {before}")) if s["model"] == target_model else ():
            groups.append((("train", f"{mona}/lora"), [
                (f"{label} train step <= 1.05 x LoRA", "train", f"{mona}/lora", 1.05),
                (f"{label} train step <= 0.85 x full FT", "train", f"{mona}/full", 0.85),
                (f"{label} peak train memory <= 1.10 x LoRA", "memory", f"{mona}/lora", 1.10),
                (f"{label} inference <= 1.04 x frozen", "inference", f"{mona}/frozen", 1.04)]))  # fmt: skip
        regression = f"no regression: Mona / Mona {before}"
        groups += [
            (("train", "mona/mona_before"), [(f"{regression}, train step <= 1.00", "train", "mona/mona_before", 1.0),
             (f"{regression}, peak train memory <= 1.00", "memory", "mona/mona_before", 1.0)]),
            (("inference", "mona/mona_before"),
             [(f"{regression}, inference <= 1.00", "inference", "mona/mona_before", 1.0)]),
            (("train", "mona/mona_ref"), [("merged <= three-conv (train step)", "train", "mona/mona_ref", 1.0),
             ("merged <= three-conv (inference)", "inference", "mona/mona_ref", 1.0)]),
        ]  # fmt: skip
        for (trigger_metric, trigger), checks in groups:
            for name, metric, pair, threshold in checks if trigger in measured[trigger_metric] else ():
                got, aa = measured[metric].get(pair), measured[metric].get("mona_twin/mona")
                targets.append(_target(name, scope, got, threshold, aa, "max", cpu[metric].get(pair)))
    if filter_result is not None:
        shape = filter_result["shape"]
        scope = f"filter alone, [{shape['batch']}, {shape['bottleneck']}, {shape['height']}, {shape['width']}]"
        for mode in ("forward", "forward_backward"):
            found = filter_result[mode]["ratios"]
            name = f"merged filter >= 1.3 x faster ({mode.replace('_', ' + ')})"
            targets.append(_target(name, scope, found["reference/merged"], 1.3, found["merged_twin/merged"], "min"))
    return targets


# ------------------------------------------------------------------------------------------------------------ main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``speed.json`` (``speed_quick.json`` with ``--quick``); returns what it wrote."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny models, batch 2, two rounds, 1 thread (smoke test)")
    add("--models", type=_names, default=None, help="comma-separated, default vit-b,swin-t")
    add("--methods", type=_names, default=[m for m in METHOD_LABELS if m != "mona_before"], help="comma-separated")
    add("--batches", type=_ints, default=None, help="comma-separated batch sizes, default 8,32")
    add("--rounds", type=_ints, default=None, help="rounds per batch size, default 8,2")
    add("--device", default="cpu", help="cpu (default) or cuda: bf16 autocast + torch.compile")
    add("--threads", type=int, default=None, help="torch threads per worker (default: all cores; 1 with --quick)")
    add("--start-method", choices=("fork", "spawn"), default=None, help="how workers start: fork (default on Linux "
        "CPU: shares the imports; needs a caller that has run no parallel torch op yet) or spawn (default with "
        "--baseline-rev and on CUDA: every worker a fresh interpreter, as mona_before's must be)")  # fmt: skip
    add("--baseline-rev", default=None, metavar="REV", help="also measure mona_before: Mona as the package was at "
        "this git revision (e.g. d706065, before the Mona layer v2 rewrite), in the same rounds")  # fmt: skip
    add("--ref-max-batch", type=int, default=8, help="run mona_ref only up to this batch size (0: all; default 8)")
    add("--skip-filter", action="store_true", help="do not time the filter on its own")
    add("--seed", type=int, default=0)
    add("--name", default=None, help="results file name (default speed, or speed_quick)")
    add("--results-dir", type=Path, default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)

    models = args.models or (["tiny-vit", "tiny-swin"] if args.quick else ["vit-b", "swin-t"])
    batches = args.batches or ([2] if args.quick else [8, 32])
    rounds = args.rounds or ([2] * len(batches) if args.quick else [8, 2][: len(batches)] + [2] * (len(batches) - 2))
    methods = list(dict.fromkeys([*args.methods, *(["mona_before"] if args.baseline_rev else [])]))
    cuda = args.device.startswith("cuda")
    if len(rounds) != len(batches):
        parser.error("--rounds needs one value per batch size")
    if unknown := [m for m in methods if m not in METHOD_LABELS]:
        parser.error(f"unknown methods {unknown}; choose from {list(METHOD_LABELS)}")
    if "mona_before" in methods and not args.baseline_rev:
        parser.error("method mona_before needs --baseline-rev")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if cuda and hasattr(torch, "compile"):
        methods += [f"{m}+compile" for m in methods if m != "mona_twin"]
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    # fork shares the imports (workers start in a second); CUDA cannot be forked. With a baseline, whose worker must
    # be a fresh interpreter, every worker is one, so that none starts with a different heap.
    fork = not cuda and sys.platform == "linux" and not args.baseline_rev
    ctx = mp.get_context(args.start_method or ("fork" if fork else "spawn"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mona_baseline_") as scratch:
        baseline = extract_baseline(args.baseline_rev, Path(scratch)) if args.baseline_rev else None
        before = f"before ({baseline['short']})" if baseline else "before"
        labels = {m: METHOD_LABELS[m.split("+")[0]] + (" + compile" if "+" in m else "") for m in methods}
        labels = {m: label.replace("before (baseline revision)", before) for m, label in labels.items()}
        mixed = "inference on a model with two Mona adapters: mona_single = the batch on the first (set_adapter), "
        mixed += "mona_mixed = model(pixel_values, adapter_names=[first half, second half])"
        current = {"git": git_revision(" + uncommitted changes in src/"), "mona_peft_file": mona_peft.__file__}
        current["mona_peft_sha256"] = package_digest(Path(mona_peft.__file__).parent)
        settings = {
            "models": models,
            "methods": methods,
            "method_labels": labels,
            "batches": batches,
            "rounds": rounds,
        }
        settings |= {"threads_per_worker": threads, "start_method": ctx.get_start_method()}
        settings |= {"precision": "bf16 autocast" if cuda else "float32", "num_labels": NUM_LABELS}
        settings |= {"optimizer": "torch.optim.AdamW(lr=1e-4), defaults otherwise"}
        settings |= {
            "memory_method": "torch.cuda.max_memory_allocated per step" if cuda else memory.method_description()
        }
        settings |= {"seed": args.seed, "ref_max_batch": args.ref_max_batch or None}
        settings |= {"mixed_batch": {"adapters": list(MIXED_ADAPTERS), "how": mixed}, "current_code": current}
        machine = {**machine_info(args.device), "torch_threads": threads}
        payload = {
            "benchmark": "speed",
            "quick": args.quick,
            "machine": machine,
            "settings": settings | {"baseline": baseline},
        }
        print(f"speed benchmark: {models} x batches {batches} x rounds {rounds}, methods {methods}", flush=True)
        load = load_average()
        if not cuda and threads > 1 and load and load[0] > (os.cpu_count() or 1):
            warning = (
                f"  warning: load average {load[0]:.1f} exceeds the {os.cpu_count()} cores; with {threads} threads "
            )
            print(warning + "per worker every parallel op waits for descheduled threads. Consider --threads 1.")
        records, configs = [], []
        for key in models:
            got, conf = run_model(key, methods, batches, rounds, args, ctx, threads, str(Path(scratch) / "src"))
            records, configs = records + got, configs + conf
    summaries = [summarize_config(c, records) for c in configs]
    filter_result = None
    if not args.skip_filter:  # in a worker of its own, at the workers' thread count
        shape = (
            dict(batch=4, bottleneck=8, grid=4, rounds=3, inner=3)
            if args.quick
            else dict(batch=32, bottleneck=64, grid=14, rounds=15, inner=10)
        )
        with ctx.Pool(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            filter_result = pool.apply(filter_benchmark, (), {**shape, "seed": args.seed})
    target_model = "tiny-vit" if args.quick else "vit-b"
    payload |= {"configs": summaries, "filter": filter_result}
    payload |= {"targets": evaluate_targets(summaries, filter_result, target_model, before), "records": records}
    payload |= {"load_average_at_end": load_average(), "seconds": round(time.perf_counter() - started, 1)}
    path = write_results(args.name or ("speed_quick" if args.quick else "speed"), payload, args.results_dir)
    for t in (t for t in payload["targets"] if "median" in t):
        print(f"  {t['status']:6s} {t['target']} [{t['scope']}]: {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})")
    print(f"wrote {path} in {payload['seconds']} s", flush=True)
    return payload


if __name__ == "__main__":
    main()
