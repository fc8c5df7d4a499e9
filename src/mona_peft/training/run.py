"""One fine-tuning run, end to end, for every task: what ``scripts/train.py`` and ``scripts/train_segmentation.py``
call (and what the tests and benchmarks call).

:func:`train` checks the output directory, prepares the data, builds the model for the method, trains with
:class:`~mona_peft.training.recipe.RecipeTrainer`, evaluates on the validation and test splits, and saves the model
(adapter-only for Mona/LoRA), the task's files, ``results.json``, a model card and the training curves. What differs
between tasks comes from a :class:`~mona_peft.training.task.Task` (default: image classification).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .card import TrainingCard, recipe_hyperparameters, write_training_card
from .data import TaskData, TaskDataset
from .distributed import end_process_group
from .hub_kernels import hub_kernels_off_by_default
from .plots import CURVES_FILE, plot_training_curves
from .recipe import EpochCallback, RecipeTrainer, base_model, count_parameters
from .task import Task

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
MODEL_FILES = ("adapter_config.json", *WEIGHT_FILES)
"""Files whose presence means an output directory already holds a trained model."""

RESUME_LATEST = ("true", "latest", "last")
RESULTS_FILE = "results.json"
"""Validation and test metrics of the final model, written next to it."""


class OutputDirError(ValueError):
    """The output directory holds a previous run, or the checkpoint to resume from does not exist."""


@dataclass
class RunResult:
    """What a run produced: the output directory, the metrics per split, and the timings."""

    output_dir: Path
    metrics: dict[str, float]
    data: TaskData
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
    """Everything a run needs before training: the task, the arguments, the data, the preprocessing, the model and
    the datasets served to the Trainer."""

    task: Task
    model_args: Any
    data_args: Any
    training_args: TrainingArguments
    data: TaskData
    model_path: str
    processor: Any
    preprocessing: Any
    model: nn.Module
    train_set: TaskDataset = field(init=False)
    validation_set: TaskDataset = field(init=False)
    test_set: TaskDataset = field(init=False)

    def __post_init__(self) -> None:
        self.train_set, self.validation_set, self.test_set = (
            TaskDataset(
                self.data.splits[name],
                self.data.image_column,
                self.data.label_column,
                self.preprocessing,
                train=name == "train",
                seed=self.training_args.seed,
            )
            for name in ("train", "validation", "test")
        )

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def is_main_process(self) -> bool:
        return self.training_args.process_index == 0


def _classification() -> Task:
    from .classification import CLASSIFICATION

    return CLASSIFICATION


def setup(model_args: Any, data_args: Any, training_args: TrainingArguments, task: Task | None = None) -> Experiment:
    """Prepare the data (splits, label map), the transforms and the model for ``model_args.method``."""
    task = task or _classification()
    with training_args.main_process_first(desc="loading the data and the model"):
        data = task.prepare_data(data_args, cache_dir=model_args.cache_dir, token=model_args.token)
        model_path = task.resolve_model_path(model_args.model_name_or_path)  # creates an offline default once
    preprocessing, processor = task.preprocessing(model_path, model_args, data_args, data)
    set_seed(training_args.seed)  # the new head's (and the adapters') initialisation
    model = task.build_model(model_args, data, model_path)
    experiment = Experiment(
        task, model_args, data_args, training_args, data, model_path, processor, preprocessing, model
    )
    if experiment.is_main_process:
        trainable, total = count_parameters(model)
        print(data.summary(), flush=True)
        print(f"{model_args.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return experiment


def make_trainer(experiment: Experiment, callbacks: Sequence[TrainerCallback] = ()) -> RecipeTrainer:
    """The Trainer for an experiment: recipe optimizer groups (the task head at ``--head_learning_rate``), the
    task's collator and metric through ``evaluate``, the epoch-seeded augmentation, and this project's model card
    (also for ``push_to_hub``)."""
    task = experiment.task
    with experiment.training_args.main_process_first(desc="loading the metric"):
        metric = task.load_metric()
    return RecipeTrainer(
        model=experiment.model,
        args=experiment.training_args,
        train_dataset=experiment.train_set,
        eval_dataset=experiment.validation_set,
        data_collator=task.collator(experiment),
        compute_metrics=task.compute_metrics(metric, experiment.data),
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        callbacks=[EpochCallback(experiment.train_set), *callbacks],
        head_learning_rate=experiment.model_args.head_learning_rate,
        head_names=task.head_names(base_model(experiment.model)),
        model_card_writer=lambda directory, steps: write_training_card(
            card_info(experiment, _metrics_of(directory), steps), directory
        ),
    )


def evaluate_splits(experiment: Experiment, trainer: RecipeTrainer) -> dict[str, float]:
    """Validation and test metrics of the trained model, saved as ``eval_results.json`` / ``test_results.json``;
    the task writes the test predictions (gathered from all processes) if it keeps them.

    In a multi-process run the Trainer's ``test_loss`` averages per-process batch losses, which count the samples
    that pad the last batch of a process; the task's metrics and the saved predictions do not.
    """
    task = experiment.task
    validation = _validation_metrics(trainer, experiment)
    trainer.save_metrics("eval", validation)
    prediction = trainer.predict(experiment.test_set, metric_key_prefix="test")
    test = prediction.metrics
    trainer.log_metrics("test", test)
    trainer.save_metrics("test", test)
    if trainer.is_world_process_zero():
        task.write_predictions(experiment, prediction)
    metrics: dict[str, float] = {}
    for split, prefix, values, count in (
        ("validation", "eval", validation, len(experiment.validation_set)),
        ("test", "test", test, len(experiment.test_set)),
    ):
        for key, value in values.items():
            name = key.removeprefix(f"{prefix}_")
            if name in task.result_metrics or name.startswith(task.result_prefixes):
                metrics[f"{split}_{name}"] = value
        metrics[f"{split}_samples"] = count
    return metrics


def save(experiment: Experiment, trainer: RecipeTrainer, metrics: dict[str, float]) -> None:
    """Save the model (adapter + head for Mona/LoRA, the whole model otherwise), the task's files (label config,
    image processor or metadata), ``results.json``, the model card and the training curves, from the main process."""
    trainer.save_model()
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    output_dir, task = experiment.output_dir, experiment.task
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    task.save_files(experiment)
    write_training_card(card_info(experiment, metrics, trainer.state.global_step), output_dir)
    plot_training_curves(
        trainer.state.log_history,
        output_dir / CURVES_FILE,
        title=f"{experiment.model_args.method} - {experiment.data.description}",
        metric=f"eval_{task.metric}",
        metric_label=f"validation {task.metric_title}",
    )


def card_info(experiment: Experiment, metrics: dict[str, float], steps: int | None = None) -> TrainingCard:
    """What the model card says about this experiment and its results: the recipe's part, then the task's."""
    model_args, data_args, training_args = experiment.model_args, experiment.data_args, experiment.training_args
    task, output_dir = experiment.task, experiment.output_dir
    trainable, total = count_parameters(experiment.model)
    weights = next((output_dir / n for n in WEIGHT_FILES if (output_dir / n).exists()), None)
    fields = task.card_fields(experiment, metrics)
    hyperparameters = recipe_hyperparameters(
        training_args,
        model_args,
        steps,
        head=task.head_title,
        no_decay=task.no_decay,
        image_size=data_args.image_size,
        augmentation=task.augmentation(data_args),
    )
    hyperparameters.update(fields.pop("hyperparameters", {}))
    return TrainingCard(
        method=model_args.method,
        task=task.pipeline_tag,
        trainable_parameters=trainable,
        total_parameters=total,
        hyperparameters=hyperparameters,
        weights_bytes=weights.stat().st_size if weights else None,
        **fields,
    )


def _metrics_of(directory: str) -> dict[str, float]:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _validation_metrics(trainer: RecipeTrainer, experiment: Experiment) -> dict[str, float]:
    """The validation metrics of the final model: the log entry of an evaluation at the last step, or a new one."""
    state, key = trainer.state, f"eval_{experiment.task.metric}"
    for entry in reversed(state.log_history):
        if key in entry and entry.get("step") == state.global_step:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate(experiment.validation_set)


@hub_kernels_off_by_default()
def train(
    model_args: Any,
    data_args: Any,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    task: Task | None = None,
) -> RunResult:
    """Fine-tune, evaluate and save: :func:`check_output_dir`, :func:`setup`, :func:`make_trainer`, training
    (resumed if asked), :func:`evaluate_splits`, :func:`save` and, with ``--push_to_hub``, the upload.
    ``callbacks`` go to the Trainer; ``task`` defaults to image classification."""
    started = time.perf_counter()
    resume = check_output_dir(training_args)
    experiment = setup(model_args, data_args, training_args, task)
    task = experiment.task
    trainer = make_trainer(experiment, callbacks)
    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_output.metrics)
    trainer.save_metrics("train", train_output.metrics)
    metrics = evaluate_splits(experiment, trainer)
    metrics["train_runtime"] = train_output.metrics.get("train_runtime", float("nan"))
    save(experiment, trainer, metrics)
    headline = metrics[f"test_{task.metric}"]
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{model_args.method}: test {task.metric_title} {headline:.4f}")

    wall = time.perf_counter() - started
    if experiment.is_main_process:
        print(
            f"Held-out test {task.metric_title}: {headline:.4f} on {metrics['test_samples']} images (validation "
            f"{metrics[f'validation_{task.metric}']:.4f}{task.summary(metrics)}); {trainer.state.global_step} steps, "
            f"{wall:.0f} s in all. Saved to {experiment.output_dir}",
            flush=True,
        )
    return RunResult(experiment.output_dir, metrics, experiment.data, wall, trainer)


def main(argv: Sequence[str] | None = None, task: Task | None = None) -> RunResult:
    """Entry point of the training scripts: parse the command line for ``task`` (default: image classification,
    ``scripts/train.py``) and run :func:`train`."""
    task = task or _classification()
    model_args, data_args, training_args = task.parse_args(argv)
    result = train(model_args, data_args, training_args, task=task)
    end_process_group()  # a launched run's processes leave the group before they exit
    return result
