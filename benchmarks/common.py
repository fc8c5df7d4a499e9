"""What every benchmark shares: the machine record, JSON output, the model zoo (configs only) and the methods."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_DIR = REPO / "docs"

# ----------------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and when a result was produced: CPU, cores, memory, library versions, date, load, command."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": load_average(),
        "command": "python -m " + _module_name() + (" " + shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else ""),
        "git": _git_revision(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return Path(sys.argv[0]).stem


def _total_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (how busy the machine was: > cores means other work competed for it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_results(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``payload`` as ``<results_dir>/<name>.json`` and return the path."""
    directory = Path(results_dir) if results_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class ModelSpec:
    """A backbone built from its config only (no weights): name, family and how to build the config."""

    key: str
    name: str
    family: str  # "vit" | "swin" | "dinov2"
    make_config: Callable[..., Any]
    image_size: int

    def config(self, **extra: Any) -> Any:
        return self.make_config(**extra)


def _swin(embed_dim: int, depths: list[int], heads: list[int]) -> Callable[..., Any]:
    def make(**extra: Any) -> Any:
        from transformers import SwinConfig

        kwargs = dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=7, image_size=224, patch_size=4)
        return SwinConfig(**{**kwargs, **extra})

    return make


def _vit(hidden: int, layers: int, heads: int) -> Callable[..., Any]:
    def make(**extra: Any) -> Any:
        from transformers import ViTConfig

        kwargs = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            image_size=224,
            patch_size=16,
        )
        return ViTConfig(**{**kwargs, **extra})

    return make


def _dinov2(hidden: int, heads: int) -> Callable[..., Any]:
    def make(**extra: Any) -> Any:
        from transformers import Dinov2Config

        # facebook/dinov2-{small,base}: 12 layers, patch 14, native image size 518, layer scale 1.0
        kwargs = dict(
            hidden_size=hidden,
            num_hidden_layers=12,
            num_attention_heads=heads,
            mlp_ratio=4,
            patch_size=14,
            image_size=518,
            layerscale_value=1.0,
        )
        return Dinov2Config(**{**kwargs, **extra})

    return make


def _tiny_vit(**extra: Any) -> Any:
    from transformers import ViTConfig

    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    return ViTConfig(**{**kwargs, **extra})


def _tiny_swin(**extra: Any) -> Any:
    from transformers import SwinConfig

    kwargs = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return SwinConfig(**{**kwargs, **extra})


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec("swin-t", "Swin-T", "swin", _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]), 224),
        ModelSpec("swin-s", "Swin-S", "swin", _swin(96, [2, 2, 18, 2], [3, 6, 12, 24]), 224),
        ModelSpec("swin-b", "Swin-B", "swin", _swin(128, [2, 2, 18, 2], [4, 8, 16, 32]), 224),
        ModelSpec("swin-l", "Swin-L", "swin", _swin(192, [2, 2, 18, 2], [6, 12, 24, 48]), 224),
        ModelSpec("vit-b", "ViT-B/16", "vit", _vit(768, 12, 12), 224),
        ModelSpec("vit-l", "ViT-L/16", "vit", _vit(1024, 24, 16), 224),
        ModelSpec("dinov2-s", "DINOv2-S/14", "dinov2", _dinov2(384, 6), 224),
        ModelSpec("dinov2-b", "DINOv2-B/14", "dinov2", _dinov2(768, 12), 224),
        ModelSpec("tiny-vit", "tiny ViT (smoke test)", "vit", _tiny_vit, 32),
        ModelSpec("tiny-swin", "tiny Swin (smoke test)", "swin", _tiny_swin, 32),
    )
}


def build_classifier(spec: ModelSpec, num_labels: int = 1000) -> nn.Module:
    """An image classifier of ``spec``'s family, randomly initialised from its config (on the current device)."""
    import transformers

    classes = {
        "vit": transformers.ViTForImageClassification,
        "swin": transformers.SwinForImageClassification,
        "dinov2": transformers.Dinov2ForImageClassification,
    }
    return classes[spec.family](spec.config(num_labels=num_labels))


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a transformers classifier (``model.vit``, ``model.swin``, ...), i.e. everything but the head."""
    return getattr(model, model.base_model_prefix)


# ----------------------------------------------------------------------------------------------------- the methods

LORA_RANK = 16
HEAD = "classifier"


def lora_target_modules(model: nn.Module) -> list[str]:
    """LoRA's q/v targets under the installed transformers' names: ``q_proj``/``v_proj`` (5.x) or ``query``/``value``
    (4.x)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in (["q_proj", "v_proj"], ["query", "value"]):
        if set(names) <= leaves:
            return names
    raise ValueError(f"{type(model).__name__} has neither q_proj/v_proj nor query/value modules.")


def lora_config(model: nn.Module, modules_to_save: list[str] | None = None) -> Any:
    """LoRA r = 16 on the attention's query and value projections (alpha = r, no dropout, no bias)."""
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_RANK,
        target_modules=lora_target_modules(model),
        modules_to_save=modules_to_save,
    )


def mona_config(
    bottleneck_dim: int = 64,
    modules_to_save: list[str] | None = None,
    default_heads: bool = False,
) -> Any:
    """Mona with the paper's defaults (kernels 3/5/7, dropout 0.1, both positions).

    No module is trained in full unless ``modules_to_save`` names some, or ``default_heads`` asks for MonaConfig's
    own default (the model's task head). How the adapters compute (fused norm + down, merged filter) is a runtime
    choice, not part of the config: see ``mona_peft.set_compute``.
    """
    from mona_peft import MonaConfig

    heads = None if default_heads else (modules_to_save or [])
    return MonaConfig(bottleneck_dim=bottleneck_dim, modules_to_save=heads)


def count(parameters: Any) -> int:
    return sum(p.numel() for p in parameters)
