"""One semantic-segmentation fine-tuning run, end to end: what ``scripts/train_segmentation.py`` calls.

The pieces are the classification recipe's (output-directory refusal, :class:`~mona_peft.training.recipe.RecipeTrainer`
with its weight-decay and head learning-rate groups, the epoch-seeded augmentation, curves); what differs is the data
(image + mask pairs), the model (UperNet on Swin) and the metric (mean IoU through the packaged ``evaluate`` module).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, TrainerCallback, TrainingArguments, set_seed

from ...metrics import load_mean_iou
from ...model_card import hub_model_id, markdown_table
from ..card import METHOD_TITLES, TrainingCard, recipe_hyperparameters, results_table, write_training_card
from ..data import IMAGENET_MEAN, IMAGENET_STD, DataError
from ..plots import CURVES_FILE, plot_training_curves
from ..recipe import EpochCallback, ModelError, RecipeTrainer, base_model, count_parameters, load_image_processor
from ..run import RESULTS_FILE, WEIGHT_FILES, OutputDirError, check_output_dir
from .arguments import SegmentationDataArguments, SegmentationModelArguments, parse_segmentation_args
from .data import (
    SegmentationData,
    SegmentationDataset,
    SegmentationPreprocessing,
    collate_segmentation,
    prepare_segmentation_data,
)
from .model import (
    RANDOM_SWIN_CONFIG,
    build_segmenter,
    resolve_segmentation_model_path,
    segmentation_head_names,
    write_metadata,
)

OFFLINE_SEGMENTATION_BASE = (
    "a small Swin (embed 32, depths 2/2/2/2, stage widths 32-256) with **randomly initialised weights** (seed 0, no "
    "pretrained Swin exists offline), written by `mona_peft.training.segmentation.ensure_random_swin()`, with a new "
    "UperNet head"
)


@dataclass
class SegmentationRunResult:
    """What a segmentation run produced: the output directory, the metrics per split, and the timings."""

    output_dir: Path
    metrics: dict[str, float]
    data: SegmentationData
    wall_seconds: float
    trainer: Any = field(repr=False, default=None)

    @property
    def test_mean_iou(self) -> float:
        return self.metrics["test_mean_iou"]


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


@dataclass
class SegmentationExperiment:
    """Everything a segmentation run needs before training."""

    model_args: SegmentationModelArguments
    data_args: SegmentationDataArguments
    training_args: TrainingArguments
    data: SegmentationData
    model_path: str
    preprocessing: SegmentationPreprocessing
    model: nn.Module
    train_set: SegmentationDataset
    validation_set: SegmentationDataset
    test_set: SegmentationDataset

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def is_main_process(self) -> bool:
        return self.training_args.process_index == 0


def _normalisation(model_path: str, model_args: SegmentationModelArguments) -> tuple[tuple, tuple]:
    try:
        processor = load_image_processor(
            model_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token
        )
    except ModelError:
        print(f"{model_path} has no image processor: normalising with the ImageNet mean and std.", flush=True)
        return IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
    return mean, std


def setup_segmentation(
    model_args: SegmentationModelArguments, data_args: SegmentationDataArguments, training_args: TrainingArguments
) -> SegmentationExperiment:
    """Prepare the data, the joint image/mask pipeline and the model for ``model_args.method``."""
    with training_args.main_process_first(desc="loading the data and the model"):
        data = prepare_segmentation_data(data_args, cache_dir=model_args.cache_dir, token=model_args.token)
        model_path = resolve_segmentation_model_path(model_args.model_name_or_path)
    mean, std = _normalisation(model_path, model_args)
    preprocessing = SegmentationPreprocessing(
        data_args.image_size, mean, std, data_args.min_crop_scale, data.ignore_index, data.reduce_labels
    )
    set_seed(training_args.seed)  # the new head's (and the adapters') initialisation
    model = build_segmenter(model_args, data.labels, data.ignore_index, model_path)

    def split(name: str, train: bool = False) -> SegmentationDataset:
        return SegmentationDataset(
            data.splits[name], data.image_column, data.mask_column, preprocessing, train, training_args.seed
        )

    experiment = SegmentationExperiment(
        model_args, data_args, training_args, data, model_path, preprocessing, model,
        split("train", train=True), split("validation"), split("test"),
    )  # fmt: skip
    if experiment.is_main_process:
        trainable, total = count_parameters(model)
        print(data.summary(), flush=True)
        print(f"{model_args.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return experiment


def make_segmentation_trainer(
    experiment: SegmentationExperiment, callbacks: Sequence[TrainerCallback] = ()
) -> RecipeTrainer:
    """The Trainer: recipe optimizer groups (the UperNet head at ``--head_learning_rate``), mean IoU through
    ``evaluate``, epoch-seeded augmentation, and the segmentation model card."""
    with experiment.training_args.main_process_first(desc="loading the metric"):
        metric = load_mean_iou()
    return RecipeTrainer(
        model=experiment.model,
        args=experiment.training_args,
        train_dataset=experiment.train_set,
        eval_dataset=experiment.validation_set,
        data_collator=collate_segmentation,
        compute_metrics=mean_iou_metrics(metric, experiment.data.labels, experiment.data.ignore_index),
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=[EpochCallback(experiment.train_set), *callbacks],
        head_learning_rate=experiment.model_args.head_learning_rate,
        head_names=segmentation_head_names(base_model(experiment.model)),
        model_card_writer=lambda directory, steps: write_training_card(
            segmentation_card(experiment, _metrics_of(directory), steps), directory
        ),
    )


def _metrics_of(directory: str) -> dict[str, float]:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _validation_metrics(trainer: RecipeTrainer, dataset: SegmentationDataset) -> dict[str, float]:
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_mean_iou" in entry and entry.get("step") == state.global_step:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate(dataset)


def evaluate_segmentation(experiment: SegmentationExperiment, trainer: RecipeTrainer) -> dict[str, float]:
    """Validation and test metrics of the trained model (also saved as ``eval_results.json``/``test_results.json``)."""
    validation = _validation_metrics(trainer, experiment.validation_set)
    trainer.save_metrics("eval", validation)
    test = trainer.evaluate(experiment.test_set, metric_key_prefix="test")
    trainer.save_metrics("test", test)
    metrics: dict[str, float] = {}
    for split, values, count in (
        ("validation", validation, len(experiment.validation_set)),
        ("test", test, len(experiment.test_set)),
    ):
        prefix = "eval" if split == "validation" else "test"
        for key, value in values.items():
            name = key.removeprefix(f"{prefix}_")
            if name in ("mean_iou", "mean_accuracy", "overall_accuracy", "loss") or name.startswith("iou_"):
                metrics[f"{split}_{name}"] = value
        metrics[f"{split}_samples"] = count
    return metrics


def save_segmentation(experiment: SegmentationExperiment, trainer: RecipeTrainer, metrics: dict[str, float]) -> None:
    """Save the model (adapter + head for Mona/LoRA, the whole model for full fine-tuning), the UperNet config with
    the labels, ``segmentation.json`` (backbone checkpoint, preprocessing), the card and the curves."""
    trainer.save_model()
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    output_dir = experiment.output_dir
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
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
    write_training_card(segmentation_card(experiment, metrics, trainer.state.global_step), output_dir)
    title = f"{experiment.model_args.method} - segmentation"
    plot_training_curves(
        trainer.state.log_history,
        output_dir / CURVES_FILE,
        title=title,
        metric="eval_mean_iou",
        metric_label="validation mean IoU",
    )


METHOD_TEXT = {
    "mona": "Mona adapters (Yin et al., CVPR 2025) in every block of the Swin backbone, plus the whole UperNet head "
    "(decode and auxiliary heads)",
    "lora": "LoRA (rank {rank}) on the Swin backbone's query and value projections, plus the whole UperNet head",
    "full": "full fine-tuning of every parameter",
}


def segmentation_card(
    experiment: SegmentationExperiment, metrics: dict[str, float], steps: int | None = None
) -> TrainingCard:
    """What the model card says about a segmentation run and its results."""
    model_args, data_args, training_args = experiment.model_args, experiment.data_args, experiment.training_args
    data, prep, output_dir = experiment.data, experiment.preprocessing, experiment.output_dir
    size = data_args.image_size
    reduced = "; labels reduced (ADE20K convention)" if data.reduce_labels else ""
    offline = model_args.model_name_or_path is None
    trainable, total = count_parameters(experiment.model)
    weights = next((output_dir / n for n in WEIGHT_FILES if (output_dir / n).exists()), None)
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
        f"{[round(v, 3) for v in prep.mean]} and std {[round(v, 3) for v in prep.std]} (also in `segmentation.json`).",
    ]
    hyperparameters = recipe_hyperparameters(
        training_args,
        model_args,
        steps,
        head="UperNet head",
        no_decay="norms, biases, scale vectors, tables",
        image_size=size,
        augmentation=f"random crop (area {data_args.min_crop_scale}-1) of image and mask + horizontal flip",
    )
    if offline:
        hyperparameters["backbone config"] = json.dumps(RANDOM_SWIN_CONFIG)
    return TrainingCard(
        method=model_args.method,
        task="image-segmentation",
        title=f"{METHOD_TITLES[model_args.method]} semantic segmentation (UperNet-Swin): {', '.join(data.labels)}",
        method_description=METHOD_TEXT[model_args.method].format(rank=model_args.lora_rank),
        base_model=None if offline else hub_model_id(model_args.model_name_or_path),
        base_description=OFFLINE_SEGMENTATION_BASE if offline else f"`{model_args.model_name_or_path}`",
        dataset=data.hub_dataset,
        data_description=f"{data.description}; {len(data.labels)} classes; inputs and masks {size} x {size} pixels; "
        f"mask value {data.ignore_index} ignored{reduced}",
        trainable_parameters=trainable,
        total_parameters=total,
        results=results,
        usage=usage,
        metrics=["mean_iou"],
        hyperparameters=hyperparameters,
        weights_bytes=weights.stat().st_size if weights else None,
        tags=["semantic-segmentation", "upernet", "swin", "vision"],
    )


def train_segmentation(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> SegmentationRunResult:
    """Fine-tune, evaluate and save a segmentation model (see the module docstring); ``callbacks`` go to the
    Trainer."""
    started = time.perf_counter()
    resume = check_output_dir(training_args)
    experiment = setup_segmentation(model_args, data_args, training_args)
    trainer = make_segmentation_trainer(experiment, callbacks)
    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_output.metrics)
    trainer.save_metrics("train", train_output.metrics)
    metrics = evaluate_segmentation(experiment, trainer)
    metrics["train_runtime"] = train_output.metrics.get("train_runtime", float("nan"))
    save_segmentation(experiment, trainer, metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{model_args.method}: test mean IoU {metrics['test_mean_iou']:.4f}")
    wall = time.perf_counter() - started
    if experiment.is_main_process:
        print(
            f"Held-out test mean IoU: {metrics['test_mean_iou']:.4f} on {metrics['test_samples']} images "
            f"(validation {metrics['validation_mean_iou']:.4f}, test pixel accuracy "
            f"{metrics['test_overall_accuracy']:.4f}); {trainer.state.global_step} steps, {wall:.0f} s in all. "
            f"Saved to {experiment.output_dir}",
            flush=True,
        )
    return SegmentationRunResult(experiment.output_dir, metrics, experiment.data, wall, trainer)


def main(argv: Sequence[str] | None = None) -> SegmentationRunResult:
    """Entry point of ``scripts/train_segmentation.py``: parse the command line and run :func:`train_segmentation`."""
    model_args, data_args, training_args = parse_segmentation_args(argv)
    return train_segmentation(model_args, data_args, training_args)


__all__ = [
    "DataError",
    "ModelError",
    "OutputDirError",
    "SegmentationRunResult",
    "main",
    "train_segmentation",
]
