"""What every benchmark shares: the machine record, JSON output, the model zoo (configs only), the methods, and the
statistics of interleaved rounds (medians, paired ratios; an A/A twin is just one more variant)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_DIR = REPO / "docs"
LORA_RANK = 16
HEAD = "classifier"


def proc_field(path: str, name: str) -> str | None:
    """The text after ``name:`` in a /proc file (``/proc/meminfo``: ``"16384 kB"``), or None (absent, not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return None


def proc_mib(path: str, name: str) -> float | None:
    """A memory field of a /proc file (in kB there) in MiB, or None."""
    value = proc_field(path, name)
    return None if value is None else int(value.split()[0]) / 1024


def git(*args: str) -> str:
    """Run git in the repository; its stdout, or RuntimeError."""
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def git_revision(dirty_mark: str = "+dirty-src") -> str | None:
    """The checkout's short commit, marked when ``src/`` has uncommitted changes; None outside git."""
    try:
        return git("rev-parse", "--short", "HEAD") + (dirty_mark if git("status", "--porcelain", "src") else "")
    except (OSError, RuntimeError):
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (above the core count, other work competed for the machine)."""
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and when a result was produced: CPU, cores, memory, library versions, date, load, command."""
    import peft
    import transformers

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None and spec.name else Path(sys.argv[0]).stem
    memory = proc_mib("/proc/meminfo", "MemTotal")
    cpu = proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    info: dict[str, Any] = {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info |= {"memory_gib": None if memory is None else round(memory / 1024, 1), "python": platform.python_version()}
    info |= {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    info |= {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    info |= {"load_average_at_start": load_average(), "git": git_revision()}
    info["command"] = " ".join(["python", "-m", module, *map(shlex.quote, sys.argv[1:])])
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and count of a sample."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else v * 3
    return {"n": len(v), "median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1]}


def paired_ratios(records: list[dict], numerator: str, denominator: str, key: str) -> dict[str, Any] | None:
    """Per-round ``key`` of ``numerator`` over ``denominator`` (same round), summarised; None if never both."""
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        by_round.setdefault(r["round"], {})[r["method"]] = r[key]
    rows = [row for _, row in sorted(by_round.items()) if numerator in row and row.get(denominator, 0) > 0]
    values = [row[numerator] / row[denominator] for row in rows]
    return {**describe(values), "values": values} if values else None


def ratios(records: list[dict], pairs: Iterable[str], key: str = "ms") -> dict[str, dict]:
    """:func:`paired_ratios` of every ``"numerator/denominator"`` pair whose methods were both measured."""
    found = {pair: paired_ratios(records, *pair.split("/"), key) for pair in pairs}
    return {pair: r for pair, r in found.items() if r is not None}


def per_method(records: list[dict], key: str = "ms") -> dict[str, dict[str, Any]]:
    """:func:`describe` of ``key`` per method, in order of first appearance."""
    methods = dict.fromkeys(r["method"] for r in records)
    return {m: describe([r[key] for r in records if r["method"] == m]) for m in methods}


def interleave(variants: dict[str, Callable[[], Any]], rounds: int, calls: int, rng: random.Random) -> list[dict]:
    """Interleaved rounds: each round times every variant once (mean ms of ``calls`` calls, at the current thread
    count) in a fresh random order, so that all share the machine's slow and fast moments; after one untimed call
    each."""
    for fn in variants.values():
        fn()
    records, threads = [], torch.get_num_threads()
    for r in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            timer = Timer(stmt="fn()", globals={"fn": variants[name]}, num_threads=threads)
            records.append({"round": r, "method": name, "ms": timer.timeit(calls).mean * 1e3})
    return records


_FAMILIES = {"vit": "ViT", "swin": "Swin", "dinov2": "Dinov2"}  # transformers' class-name prefixes


@dataclass(frozen=True)
class ModelSpec:
    """A backbone built from its config only (no weights): family ``vit`` | ``swin`` | ``dinov2`` and its config."""

    key: str
    name: str
    family: str
    kwargs: dict[str, Any] = field(hash=False)
    image_size: int = 224

    def config(self, **extra: Any) -> Any:
        """The transformers config, with ``extra`` arguments on top."""
        import transformers

        return getattr(transformers, f"{_FAMILIES[self.family]}Config")(**{**self.kwargs, **extra})


def _swin(embed_dim: int, depths: list[int], heads: list[int]) -> dict[str, Any]:
    return dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=7, image_size=224, patch_size=4)


def _vit(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden)
    return {**sizes, "image_size": 224, "patch_size": 16, **extra}


def _dinov2(hidden: int, heads: int) -> dict[str, Any]:
    # facebook/dinov2-{small,base}: 12 layers, patch 14, native image size 518, layer scale 1.0
    sizes = dict(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads, mlp_ratio=4, patch_size=14)
    return {**sizes, "image_size": 518, "layerscale_value": 1.0}


_TINY_VIT = _vit(32, 2, 4, intermediate_size=64, image_size=32, patch_size=8)
_TINY_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec("swin-t", "Swin-T", "swin", _swin(96, [2, 2, 6, 2], [3, 6, 12, 24])),
        ModelSpec("swin-s", "Swin-S", "swin", _swin(96, [2, 2, 18, 2], [3, 6, 12, 24])),
        ModelSpec("swin-b", "Swin-B", "swin", _swin(128, [2, 2, 18, 2], [4, 8, 16, 32])),
        ModelSpec("swin-l", "Swin-L", "swin", _swin(192, [2, 2, 18, 2], [6, 12, 24, 48])),
        ModelSpec("vit-b", "ViT-B/16", "vit", _vit(768, 12, 12)),
        ModelSpec("vit-l", "ViT-L/16", "vit", _vit(1024, 24, 16)),
        ModelSpec("dinov2-s", "DINOv2-S/14", "dinov2", _dinov2(384, 6)),
        ModelSpec("dinov2-b", "DINOv2-B/14", "dinov2", _dinov2(768, 12)),
        ModelSpec("tiny-vit", "tiny ViT (smoke test)", "vit", _TINY_VIT, 32),
        ModelSpec("tiny-swin", "tiny Swin (smoke test)", "swin", _TINY_SWIN, 32),
    )
}


def build_classifier(spec: ModelSpec, num_labels: int = 1000) -> nn.Module:
    """An image classifier of ``spec``'s family, randomly initialised from its config (on the current device)."""
    import transformers

    return getattr(transformers, f"{_FAMILIES[spec.family]}ForImageClassification")(spec.config(num_labels=num_labels))


def lora_config(model: nn.Module | None = None, modules_to_save: list[str] | None = None,
                targets: list[str] | None = None) -> Any:  # fmt: skip
    """LoRA r = 16 (alpha = r, no dropout) on ``targets``, by default ``model``'s attention query and value."""
    from peft import LoraConfig

    from mona_peft.training.recipe import lora_target_modules

    targets = targets or lora_target_modules(model)
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, modules_to_save=modules_to_save)


def mona_config(bottleneck_dim: int = 64, modules_to_save: list[str] | None = None,
                default_heads: bool = False) -> Any:  # fmt: skip
    """Mona with the paper's defaults (kernels 3/5/7, dropout 0.1, both positions). Nothing is trained in full unless
    ``modules_to_save`` names it, or ``default_heads`` asks for MonaConfig's own default (the task head). How the
    adapters compute is a runtime choice: ``mona_peft.set_compute``."""
    from mona_peft import MonaConfig

    heads = None if default_heads else (modules_to_save or [])
    return MonaConfig(bottleneck_dim=bottleneck_dim, modules_to_save=heads)


def filter_input(batch: int, channels: int, grid: int) -> tuple[torch.Tensor, list[nn.Parameter], list[nn.Parameter]]:
    """The depthwise filter's input as ``MonaAdapter.forward`` hands it over (the patch tokens of a [B, 1 + H*W, m]
    tensor, transposed to [B, m, H, W]: a channels-last view), and the weights and biases of 3x3, 5x5 and 7x7 convs."""
    image = torch.randn(batch, 1 + grid * grid, channels)[:, 1:].transpose(1, 2).reshape(batch, channels, grid, grid)
    convs = [nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in (3, 5, 7)]
    return image, [c.weight for c in convs], [c.bias for c in convs]


def count(parameters: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in parameters)
