"""Segmentation models for the recipe: UperNet on a Swin backbone, per fine-tuning method.

``--model_name_or_path`` may name a Swin checkpoint (its weights become the backbone of a new UperNet, as in the
paper's ADE20K setting, where an ImageNet Swin gets an UperNet head) or a whole UperNet checkpoint. The default is a
small randomly initialised Swin written once into the cache with a fixed seed, so that every run (and every reload of
a saved adapter) sees the same backbone: no pretrained Swin weights can be had offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..hub_kernels import hub_kernels_off_by_default
from ..recipe import ModelError, hub_kwargs, lora_target_modules
from .arguments import SegmentationModelArguments

RANDOM_SWIN_NAME = "swin-mini-random-seed0"
RANDOM_SWIN_SEED = 0
RANDOM_SWIN_CONFIG: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 4,
    "embed_dim": 32,
    "depths": [2, 2, 2, 2],
    "num_heads": [1, 2, 4, 8],
    "window_size": 4,
    "drop_path_rate": 0.1,
}
"""Swin-T's layout scaled down (embed 32 instead of 96, two blocks per stage): stage widths 32/64/128/256."""

UPERNET_HEAD: dict[str, Any] = {"hidden_size": 64, "auxiliary_channels": 32, "pool_scales": [1, 2, 3, 6]}
"""UperNet head sizes for small Swin backbones (transformers' defaults, 512/256 channels, suit Swin-B/L)."""

SWIN_MODEL_TYPES = ("swin",)
METADATA_FILE = "segmentation.json"
"""Written next to a trained model: the backbone checkpoint it was built on and the preprocessing."""


def _cache_root() -> Path:
    root = os.environ.get("MONA_PEFT_CACHE") or Path.home() / ".cache" / "mona_peft"
    return Path(root).expanduser()


def ensure_random_swin(directory: str | Path | None = None) -> Path:
    """A randomly initialised small Swin checkpoint (``SwinModel`` + an ImageNet-statistics image processor), written
    on first use with seed 0 into ``directory`` (default ``~/.cache/mona_peft/swin-mini-random-seed0``).

    The weights are random, not pretrained: the directory only makes the default backbone the same for every run and
    for reloading adapters trained on it. It is written to a temporary sibling and renamed into place.
    """
    from transformers import SwinConfig, SwinModel, ViTImageProcessor

    target = Path(directory) if directory is not None else _cache_root() / RANDOM_SWIN_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SWIN_SEED)
            model = SwinModel(SwinConfig(**RANDOM_SWIN_CONFIG), add_pooling_layer=False)
        model.save_pretrained(staging)
        size = RANDOM_SWIN_CONFIG["image_size"]
        ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
        ).save_pretrained(staging)
        (staging / "RANDOM_WEIGHTS.txt").write_text(
            "Randomly initialised Swin (seed 0), written by mona_peft.training.segmentation.ensure_random_swin. "
            "Not pretrained.\n"
        )
        try:
            staging.rename(target)
        except OSError:  # another process got there first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_segmentation_model_path(model_name_or_path: str | None) -> str:
    """The checkpoint to build on: the argument, or the cached random Swin."""
    return model_name_or_path if model_name_or_path is not None else str(ensure_random_swin())


def load_segmenter(
    model_args: SegmentationModelArguments, labels: list[str], ignore_index: int, model_path: str | None = None
) -> nn.Module:
    """An ``UperNetForSemanticSegmentation`` for ``labels`` (no method applied yet).

    A Swin checkpoint becomes the backbone of a new UperNet head (:data:`UPERNET_HEAD` sizes for backbones narrower
    than Swin-B, transformers' defaults otherwise); an UperNet checkpoint is loaded with its head resized to
    ``labels`` when the number of classes differs.
    """
    from transformers import AutoConfig, SwinBackbone, UperNetConfig, UperNetForSemanticSegmentation

    path = model_path or resolve_segmentation_model_path(model_args.model_name_or_path)
    hub = hub_kwargs(model_args)
    label_maps = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    config = AutoConfig.from_pretrained(path, **hub)
    if config.model_type == "upernet":
        config = AutoConfig.from_pretrained(path, loss_ignore_index=ignore_index, **label_maps, **hub)
        model = UperNetForSemanticSegmentation.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
        )
    elif config.model_type in SWIN_MODEL_TYPES:
        stages = [f"stage{i + 1}" for i in range(len(config.depths))]
        # SwinBackbone, not AutoBackbone: transformers 5.x's AutoBackbone asks the Hub about local directories.
        backbone = SwinBackbone.from_pretrained(path, out_features=stages, **hub)
        head = UPERNET_HEAD if config.embed_dim < 128 else {}
        upernet = UperNetConfig(backbone_config=backbone.config, loss_ignore_index=ignore_index, **head, **label_maps)
        model = UperNetForSemanticSegmentation(upernet)
        model.backbone = backbone
    else:
        raise ModelError(
            f"{path} is a {config.model_type} checkpoint; the segmentation recipe takes a Swin checkpoint (which gets "
            "an UperNet head) or an UperNet checkpoint."
        )
    return model


def segmentation_head_names(model: nn.Module) -> list[str]:
    """The task head of a segmentation model: what Mona trains besides its adapters by default."""
    from ...heads import task_head_modules
    from ...model import default_target_regex

    pattern = re.compile(default_target_regex(model))
    blocks = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
    heads = task_head_modules(model, blocks)
    if not heads:
        raise ModelError(f"Cannot find the task head of {type(model).__name__} outside its backbone.")
    return heads


def backbone_lora_targets(model: nn.Module) -> str:
    """LoRA's ``target_modules`` for a segmentation model: the query/value projections of the backbone only."""
    names = "|".join(re.escape(n) for n in lora_target_modules(model))
    return rf"backbone\..*\.({names})"


def write_metadata(output_dir: str | Path, **values: Any) -> Path:
    path = Path(output_dir) / METADATA_FILE
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


@hub_kernels_off_by_default()
def load_trained_segmenter(directory: str | Path) -> nn.Module:
    """A segmentation model trained by ``scripts/train_segmentation.py``, ready for inference (eval mode).

    For Mona/LoRA the UperNet is rebuilt around the backbone checkpoint recorded in ``segmentation.json`` and the
    adapter (with the trained head) is loaded onto it; a fully fine-tuned model loads directly.
    """
    from peft import PeftModel
    from transformers import SwinBackbone, UperNetConfig, UperNetForSemanticSegmentation

    from ..inference import resolve_base_model

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        return UperNetForSemanticSegmentation.from_pretrained(directory).eval()
    meta = json.loads((directory / METADATA_FILE).read_text())
    config = UperNetConfig.from_pretrained(directory)
    model = UperNetForSemanticSegmentation(config)
    if meta.get("backbone_checkpoint"):
        model.backbone = SwinBackbone.from_pretrained(
            resolve_base_model(meta["backbone_checkpoint"]), out_features=config.backbone_config.out_features
        )
    elif meta.get("base_checkpoint"):
        model = UperNetForSemanticSegmentation.from_pretrained(meta["base_checkpoint"], config=config)
    return PeftModel.from_pretrained(model, directory).eval()
