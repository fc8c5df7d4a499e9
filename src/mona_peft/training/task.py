"""What a task (classification, segmentation, detection) supplies to the one training pipeline.

The pipeline (:mod:`.run`) does the rest the same way for every task: output-directory refusal and resume, the
recipe's arguments and :class:`~mona_peft.training.recipe.RecipeTrainer` (optimizer groups, schedule), the
epoch-seeded :class:`~mona_peft.training.data.TaskDataset`, the method applied to the model
(:func:`~mona_peft.training.recipe.prepare_model`), evaluation on validation and test, ``results.json``, the model card
(:class:`~mona_peft.training.card.TrainingCard`) and the curves. A task is an object of a :class:`Task` subclass; its
hooks receive the run's :class:`~mona_peft.training.run.Experiment` where they need more than one piece of it.

Detection (:mod:`mona_peft.training.detection`) has the same shape: its label column holds each image's objects, its
preprocessing transforms boxes with the image, its collator keeps per-image target lists, and its metric (mAP) turns
the model's outputs into boxes in ``compute_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .data import make_collator

if TYPE_CHECKING:
    from torch import nn
    from transformers import EvalPrediction, TrainingArguments

    from .data import TaskData
    from .run import Experiment


class Task:
    """The task-specific part of a training run. Subclasses set the attributes and implement the hooks."""

    name: str
    """Short name, e.g. ``classification``; also what ``train``'s log lines and errors call the task."""
    pipeline_tag: str
    """The Hub ``pipeline_tag`` of the model card, e.g. ``image-classification``."""
    metric: str
    """The headline metric's key as ``compute_metrics`` returns it, e.g. ``accuracy`` or ``mean_iou``."""
    metric_title: str
    """How the headline metric is written in the final line, the push message and the curves, e.g. ``mean IoU``."""
    result_metrics: tuple[str, ...] = ("loss",)
    """Per-split metrics kept in ``results.json`` (as ``validation_<name>`` / ``test_<name>``)."""
    result_prefixes: tuple[str, ...] = ()
    """Prefixes of further per-split metrics kept, e.g. ``iou_`` for per-class IoU."""
    head_title: str = "head"
    """What the card's Training table calls the part trained at ``--head_learning_rate``."""
    no_decay: str = "norms, biases, scale vectors"
    """What the card's Training table says is kept out of weight decay."""
    preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None
    """Passed to the Trainer: reduce the logits before they are gathered (e.g. segmentation's arg-max maps)."""

    def parse_args(self, argv: Sequence[str] | None = None) -> tuple[Any, Any, TrainingArguments]:
        """The command line (or one ``.json`` file) as model, data and training arguments, recipe defaults in."""
        raise NotImplementedError

    def prepare_data(self, data_args: Any, cache_dir: str | None = None, token: str | None = None) -> TaskData:
        """The checked train/validation/test splits, their image and label columns, and the class names."""
        raise NotImplementedError

    def resolve_model_path(self, model_name_or_path: str | None) -> str:
        """The checkpoint to build on: the argument, or the task's offline default (created on first use)."""
        raise NotImplementedError

    def preprocessing(self, model_path: str, model_args: Any, data_args: Any, data: TaskData) -> tuple[Any, Any]:
        """``(preprocessing, processor)``: an object with ``example(image, label, rng)`` (the transforms, augmented
        when ``rng`` is given) and the image processor to save with the model (``None`` if none is saved)."""
        raise NotImplementedError

    def build_model(self, model_args: Any, data: TaskData, model_path: str) -> nn.Module:
        """The model for the data's classes with ``model_args.method`` applied
        (:func:`~mona_peft.training.recipe.prepare_model`)."""
        raise NotImplementedError

    def head_names(self, model: nn.Module) -> list[str]:
        """Module names of the task head in the (base) model, trained at ``--head_learning_rate``."""
        raise NotImplementedError

    def collator(self, experiment: Experiment) -> Callable[[Sequence[dict]], dict[str, Any]]:
        """The Trainer's ``data_collator`` (default: stack ``pixel_values`` and ``labels``)."""
        return make_collator()

    def load_metric(self) -> Any:
        """The ``evaluate`` metric module."""
        raise NotImplementedError

    def compute_metrics(self, metric: Any, data: TaskData) -> Callable[[EvalPrediction], dict[str, float]]:
        """The Trainer's ``compute_metrics``; its keys include :attr:`metric`."""
        raise NotImplementedError

    def write_predictions(self, experiment: Experiment, prediction: Any) -> None:
        """Write the test predictions (the Trainer's ``PredictionOutput``, gathered from all processes) from the main
        process (default: nothing)."""

    def save_files(self, experiment: Experiment) -> None:
        """Write what the task keeps next to the model (label config, processor, metadata), from the main process."""

    def augmentation(self, data_args: Any) -> str:
        """The training augmentation, as the card's Training table states it."""
        raise NotImplementedError

    def card_fields(self, experiment: Experiment, metrics: dict[str, float]) -> dict[str, Any]:
        """The task's fields of :class:`~mona_peft.training.card.TrainingCard` (title, method and base-model
        descriptions, dataset, data description, results, usage, metrics, tags); a ``hyperparameters`` dict is added
        to the recipe's Training table."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, float]) -> str:
        """Extra text for the final line's parenthesis after the validation figure (default: none)."""
        return ""
