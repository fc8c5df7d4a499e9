"""Semantic segmentation as a task of the training pipeline (``scripts/train_segmentation.py``): image + mask
columns, joint transforms of image and mask, UperNet on a Swin backbone, mean IoU through the packaged ``evaluate``
module, and its card. Everything else is the pipeline's (:mod:`mona_peft.training.run`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

from ...metrics import load_mean_iou
from ...model_card import hub_model_id, markdown_table
from ..card import METHOD_TITLES, results_table
from ..data import TaskData
from ..recipe import base_model, image_normalisation, prepare_model
from ..run import RunResult, train
from ..task import Task
from .arguments import SegmentationDataArguments, SegmentationModelArguments, parse_segmentation_args
from .data import SegmentationPreprocessing, prepare_segmentation_data
from .model import (
    RANDOM_SWIN_CONFIG,
    backbone_lora_targets,
    load_segmenter,
    resolve_segmentation_model_path,
    segmentation_head_names,
    write_metadata,
)

if TYPE_CHECKING:
    from ..run import Experiment

OFFLINE_SEGMENTATION_BASE = (
    "a small Swin (embed 32, depths 2/2/2/2, stage widths 32-256) with **randomly initialised weights** (seed 0, no "
    "pretrained Swin exists offline), written by `mona_peft.training.segmentation.ensure_random_swin()`, with a new "
    "UperNet head"
)


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep the predicted class map [B, H, W] instead of the logits, resized to
    the labels' size if the model predicts at another resolution."""
    if isinstance(logits, tuple):
        logits = logits[0]
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def mean_iou_metrics(
    metric: Any, labels: Sequence[str], ignore_index: int
) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: mean IoU, mean and overall pixel accuracy, and the IoU of every class
    (``iou_<name>``) through the packaged ``evaluate`` module."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.asarray(prediction.predictions)
        references = np.asarray(prediction.label_ids)
        result = metric.compute(
            predictions=list(predicted),
            references=list(references),
            num_labels=len(labels),
            ignore_index=ignore_index,
        )
        metrics = {k: float(result[k]) for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for name, iou in zip(labels, result["per_category_iou"], strict=True):
            metrics[f"iou_{name}"] = float(iou)
        return metrics

    return compute


METHOD_TEXT = {
    "mona": "Mona adapters (Yin et al., CVPR 2025) in every block of the Swin backbone, plus the whole UperNet head "
    "(decode and auxiliary heads)",
    "lora": "LoRA (rank {rank}) on the Swin backbone's query and value projections, plus the whole UperNet head",
    "full": "full fine-tuning of every parameter",
}


class SegmentationTask(Task):
    """Fine-tune an UperNet (new, or from an UperNet checkpoint) on a Swin backbone for the masks' classes."""

    name = "segmentation"
    pipeline_tag = "image-segmentation"
    metric = "mean_iou"
    metric_title = "mean IoU"
    result_metrics = ("mean_iou", "mean_accuracy", "overall_accuracy", "loss")
    result_prefixes = ("iou_",)
    head_title = "UperNet head"
    no_decay = "norms, biases, scale vectors, tables"
    preprocess_logits_for_metrics = staticmethod(argmax_logits)

    def parse_args(self, argv: Sequence[str] | None = None) -> tuple[Any, Any, TrainingArguments]:
        return parse_segmentation_args(argv)

    def prepare_data(self, data_args: Any, cache_dir: str | None = None, token: str | None = None) -> TaskData:
        return prepare_segmentation_data(data_args, cache_dir=cache_dir, token=token)

    def resolve_model_path(self, model_name_or_path: str | None) -> str:
        return resolve_segmentation_model_path(model_name_or_path)

    def preprocessing(self, model_path: str, model_args: Any, data_args: Any, data: Any) -> tuple[Any, Any]:
        mean, std = image_normalisation(model_path, model_args)
        preprocessing = SegmentationPreprocessing(
            data_args.image_size, mean, std, data_args.min_crop_scale, data.ignore_index, data.reduce_labels
        )
        return preprocessing, None

    def build_model(self, model_args: Any, data: Any, model_path: str) -> nn.Module:
        model = load_segmenter(model_args, data.labels, data.ignore_index, model_path)
        return prepare_model(model, model_args, segmentation_head_names(model), backbone_lora_targets(model))

    def head_names(self, model: nn.Module) -> list[str]:
        return segmentation_head_names(model)

    def load_metric(self) -> Any:
        return load_mean_iou()

    def compute_metrics(self, metric: Any, data: Any) -> Callable[[EvalPrediction], dict[str, float]]:
        return mean_iou_metrics(metric, data.labels, data.ignore_index)

    def save_files(self, experiment: Experiment) -> None:
        """The UperNet config with the labels and ``segmentation.json`` (backbone checkpoint, preprocessing)."""
        output_dir = experiment.output_dir
        base_model(experiment.model).config.save_pretrained(output_dir)
        source_is_upernet = base_model(experiment.model).config.model_type == "upernet" and (
            Path(experiment.model_path, "config.json").is_file()
            and json.loads(Path(experiment.model_path, "config.json").read_text()).get("model_type") == "upernet"
        )
        prep = experiment.preprocessing
        write_metadata(
            output_dir,
            method=experiment.model_args.method,
            backbone_checkpoint=None if source_is_upernet else experiment.model_path,
            base_checkpoint=experiment.model_path if source_is_upernet else None,
            random_backbone=experiment.model_args.model_name_or_path is None,
            image_size=prep.image_size,
            image_mean=list(prep.mean),
            image_std=list(prep.std),
            ignore_index=prep.ignore_index,
            reduce_labels=prep.reduce_labels,
            labels=experiment.data.labels,
        )

    def augmentation(self, data_args: Any) -> str:
        return f"random crop (area {data_args.min_crop_scale}-1) of image and mask + horizontal flip"

    def card_fields(self, experiment: Experiment, metrics: dict[str, float]) -> dict[str, Any]:
        model_args, data_args = experiment.model_args, experiment.data_args
        data, prep, output_dir = experiment.data, experiment.preprocessing, experiment.output_dir
        size = data_args.image_size
        reduced = "; labels reduced (ADE20K convention)" if data.reduce_labels else ""
        offline = model_args.model_name_or_path is None
        results = [
            "Mean IoU over the classes, accumulated over all pixels of a split at the model's input resolution.",
            "",
            *results_table(
                metrics,
                [("mean_iou", "mean IoU"), ("mean_accuracy", "mean accuracy"), ("overall_accuracy", "pixel accuracy")],
            ),
        ]
        per_class = [(label, metrics.get(f"test_iou_{label}")) for label in data.labels]
        if any(value is not None for _, value in per_class):
            rows = [(label, None if value is None else f"{value:.4f}") for label, value in per_class]
            results += ["", *markdown_table(["class", "test IoU"], rows)]
        usage = [
            "```python",
            "import mona_peft  # first: registers Mona with PEFT",
            "from mona_peft.training.segmentation import load_trained_segmenter",
            "",
            f'model = load_trained_segmenter("{output_dir}")  # UperNet + backbone + adapter and head',
            "logits = model(pixel_values=pixel_values).logits  # [batch, classes, height, width]",
            "```",
            "",
            f"Inputs are RGB images resized to {size} x {size} and normalised with mean "
            f"{[round(v, 3) for v in prep.mean]} and std {[round(v, 3) for v in prep.std]} (also in "
            "`segmentation.json`).",
        ]
        title = f"{METHOD_TITLES[model_args.method]} semantic segmentation (UperNet-Swin): {', '.join(data.labels)}"
        return {
            "title": title,
            "method_description": METHOD_TEXT[model_args.method].format(rank=model_args.lora_rank),
            "base_model": None if offline else hub_model_id(model_args.model_name_or_path),
            "base_description": OFFLINE_SEGMENTATION_BASE if offline else f"`{model_args.model_name_or_path}`",
            "dataset": data.hub_dataset,
            "data_description": f"{data.description}; {len(data.labels)} classes; inputs and masks {size} x {size} "
            f"pixels; mask value {data.ignore_index} ignored{reduced}",
            "results": results,
            "usage": usage,
            "metrics": ["mean_iou"],
            "tags": ["semantic-segmentation", "upernet", "swin", "vision"],
            "hyperparameters": {"backbone config": json.dumps(RANDOM_SWIN_CONFIG)} if offline else {},
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return f", test pixel accuracy {metrics['test_overall_accuracy']:.4f}"


SEGMENTATION = SegmentationTask()
"""The semantic-segmentation task."""


def train_segmentation(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> RunResult:
    """Fine-tune, evaluate and save a segmentation model: :func:`mona_peft.training.run.train` with this task;
    ``callbacks`` go to the Trainer."""
    return train(model_args, data_args, training_args, callbacks, task=SEGMENTATION)


def main(argv: Sequence[str] | None = None) -> RunResult:
    """Entry point of ``scripts/train_segmentation.py``: parse the command line and run :func:`train_segmentation`."""
    return train_segmentation(*parse_segmentation_args(argv))
