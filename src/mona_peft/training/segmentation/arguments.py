"""Command-line arguments of ``scripts/train_segmentation.py``: the classification script's conventions (the same
``TrainingArguments`` recipe defaults, ``--method``, ``--output_dir`` refusal, JSON argument files) with segmentation's
model and data options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments

from ..arguments import DataArguments, ModelArguments, _short_name, arg, method_arg, parse_task_args
from .scenes import DEFAULT_NUM_SCENES

SEGMENTATION_METHODS = ("mona", "lora", "full")
"""Mona adapters in the Swin backbone + the whole UperNet head; LoRA r16 on the backbone's query/value + head; every
parameter."""

SEGMENTATION_LEARNING_RATES = {"mona": 1e-3, "lora": 1e-3, "full": 2e-4}
"""Peak learning rate of the backbone's trained parameters per method when ``--learning_rate`` is not given (the
UperNet head follows ``--head_learning_rate``). Chosen for the default run, whose backbone is randomly initialised;
pretrained backbones usually want smaller ones (the paper's ADE20K runs: AdamW 3e-4 times a multiplier, 160k steps)."""

DEFAULT_SEGMENTATION_IMAGE_SIZE = 64
OFFLINE_SEGMENTATION_MODEL = "swin-mini-random"
DEFAULT_SEGMENTATION_DATA = "scenes"


@dataclass
class SegmentationModelArguments(ModelArguments):
    """Which backbone or segmentation model to fine-tune, and how."""

    supports_drop_path: ClassVar[bool] = False

    model_name_or_path: str | None = arg(
        help="Hub id or local directory of a Swin checkpoint (an UperNet head is added on its four stages) or of an "
        "UperNetForSemanticSegmentation checkpoint. Default: a small randomly initialised Swin (no pretrained Swin "
        "weights exist offline), created once with a fixed seed in ~/.cache/mona_peft."
    )
    method: str = method_arg(
        SEGMENTATION_METHODS,
        "Mona in every Swin block + the UperNet head",
        "LoRA r16 on the backbone's query/value + head",
    )


@dataclass
class SegmentationDataArguments(DataArguments):
    """Which image/mask pairs to train and evaluate on, and how to preprocess them."""

    dataset_name: str | None = arg(
        help="A dataset on the Hub (or a local dataset directory) with an image column and a mask column. Default "
        "(with no --train_dir either): procedurally generated scenes of shapes (see --num_scenes)."
    )
    train_dir: str | None = arg(
        help="Folder with images/<name>.<ext> and masks/<name>.png (one class index per mask pixel)."
    )
    validation_dir: str | None = arg(help="Like --train_dir, for validation.")
    test_dir: str | None = arg(help="Like --train_dir, for the held-out test split.")
    image_column_name: str | None = arg(help="Column holding the images (default: 'image', 'pixel_values' or 'img').")
    label_column_name: str | None = arg(
        help="Column holding the masks (default: 'label', 'annotation', 'semantic_map', 'mask', ...)."
    )
    class_names: str | None = arg(
        help="Class names, index = mask value (after --reduce_labels): comma-separated, or a .json file with a list "
        "or an id2label dict. Default: the scenes' names, else '0'..'N-1' from the largest mask value."
    )
    ignore_index: int = arg(255, "Mask value of pixels left out of the loss and the metric.")
    reduce_labels: bool = arg(
        False, "ADE20K convention: mask value 0 becomes --ignore_index and every class moves down by one."
    )
    num_scenes: int = arg(DEFAULT_NUM_SCENES, "How many scenes to generate for the default data.")
    image_size: int = arg(
        DEFAULT_SEGMENTATION_IMAGE_SIZE, "Side of the square model input (and of the masks the metric is computed on)."
    )
    min_crop_scale: float = arg(0.5, "Smallest area fraction of the random training crops (image and mask).")
    skip_undecodable_images: bool = arg(
        False, "Not supported for segmentation: an image or mask that cannot be decoded is an error."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.skip_undecodable_images:
            raise ValueError("--skip_undecodable_images is not supported for segmentation; remove the broken pairs.")
        if self.num_scenes < 1:
            raise ValueError(f"--num_scenes must be a positive integer, got {self.num_scenes}.")
        if self.ignore_index < 0:
            raise ValueError(f"--ignore_index must not be negative, got {self.ignore_index}.")


def default_segmentation_output_dir(method: str, model_name_or_path: str | None, data: dict[str, Any]) -> str:
    """``outputs/seg-<method>-<model>-<data>``, e.g. ``outputs/seg-mona-swin-mini-random-scenes``."""
    model = OFFLINE_SEGMENTATION_MODEL if model_name_or_path is None else _short_name(model_name_or_path)
    source = data.get("dataset_name") or data.get("train_dir")
    dataset = DEFAULT_SEGMENTATION_DATA if source is None else _short_name(source)
    return os.path.join("outputs", f"seg-{method}-{model}-{dataset}")


def parse_segmentation_args(
    argv: Sequence[str] | None = None,
) -> tuple[SegmentationModelArguments, SegmentationDataArguments, TrainingArguments]:
    """Parse the command line (or one ``.json`` file) like :func:`~mona_peft.training.arguments.parse_args`."""
    return parse_task_args(
        argv,
        (SegmentationModelArguments, SegmentationDataArguments),
        "Fine-tune a semantic-segmentation model (UperNet on a Swin backbone) with Mona (or LoRA, full fine-tuning) "
        "using transformers' Trainer. With no arguments: Mona on a small randomly initialised Swin and procedurally "
        "generated scenes of shapes, all offline.",
        SEGMENTATION_LEARNING_RATES,
        default_segmentation_output_dir,
    )
