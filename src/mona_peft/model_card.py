"""Model cards: the one builder behind ``push_to_hub`` of Mona adapters and the ``README.md`` of every training run.

A card is YAML front matter plus Markdown: a title, an introduction and sections. :func:`build_card` makes it, and
can update a card that is already in a repo: its metadata is extended, text written by a person is kept, and a section
with a ``key`` (the library writes one per adapter path) sits between markers and replaces the section with the same
key written before. :func:`hub_model_id` is the one rule for what counts as a Hub repo id in a card.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

MONA_PAPER_URL = "https://arxiv.org/abs/2408.08345"
# Sentences of the boilerplate cards of transformers and of huggingface_hub's default template (used by PEFT):
# a README containing one of them was generated, not written by a person, and is replaced rather than extended.
_BOILERPLATE = (
    "This model card has been automatically generated.",
    "<!-- Provide a quick summary of what the model is/does. -->",
)
_VERSIONED = ("mona-peft", "peft", "transformers", "torch", "datasets", "accelerate", "evaluate")


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """``name_or_path`` if it names a Hub repo (``name`` or ``namespace/name``, not an existing local path), else
    None: cards name only Hub repos as ``base_model`` (the Hub refuses local paths there)."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return None
    return str(name_or_path)


def framework_versions() -> str:
    """``python 3.11.7, mona-peft 0.1.0, peft ..., torch ...`` (and datasets, accelerate, evaluate where installed)."""
    versions = [f"python {platform.python_version()}"]
    for name in _VERSIONED:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table, one line per row (a float shows 4 significant digits, None an empty cell)."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(format_value(value) for value in row) + " |" for row in rows),
    ]


def format_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.0f} KiB"


def merge_unique(*lists: Iterable[str]) -> list[str]:
    merged: list[str] = []
    for items in lists:
        merged.extend(item for item in items if item and item not in merged)
    return merged


def as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass
class CardSection:
    """A ``## heading`` and its Markdown lines. A section with a ``key`` is written between
    ``<!-- mona_peft <key> -->`` markers and replaces the section with that key in an existing card."""

    heading: str
    lines: list[str]
    key: str | None = None

    def render(self) -> str:
        text = "\n".join([f"## {self.heading}", "", *self.lines])
        return f"<!-- mona_peft {self.key} -->\n{text}\n<!-- /mona_peft {self.key} -->" if self.key else text


@dataclass
class CardMetadata:
    """The card's front matter. ``results`` (metric -> value) also go into ``model-index`` when a dataset and a
    pipeline tag are known (one result per task, dataset and metric: a new one replaces the old).
    ``keep_pipeline_tag``: an existing card's pipeline tag wins over ``pipeline_tag`` (which was only inferred)."""

    library_name: str
    pipeline_tag: str | None = None
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    results: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    keep_pipeline_tag: bool = False


def build_card(
    title: str,
    intro: Sequence[str],
    sections: Sequence[CardSection],
    metadata: CardMetadata,
    existing: ModelCard | None = None,
) -> ModelCard:
    """The model card (no network access): ``# title``, the ``intro`` lines, then the sections.

    With an ``existing`` card, its metadata is kept and extended, its text is kept (a generated boilerplate card is
    replaced) and only the sections with a key are replaced or added. A PEFT adapter's card gets the tag
    ``base_model:adapter:<base>`` that the Hub uses to link adapters to their base model.
    """
    data = existing.data if existing is not None else ModelCardData()
    text = existing.text if existing is not None else ""
    if existing is None or any(sentence in text for sentence in _BOILERPLATE) or not text.strip():
        text = "\n".join([f"# {title}", "", *intro]) + "\n"
    for section in sections:
        rendered = section.render()
        head, end = rendered.split("\n", 1)[0], rendered.rsplit("\n", 1)[-1]
        match = re.search(re.escape(head) + r".*?" + re.escape(end), text, flags=re.DOTALL) if section.key else None
        if match:
            text = text[: match.start()] + rendered + text[match.end() :]
        else:
            text = text.rstrip("\n") + "\n\n" + rendered + "\n"

    base = metadata.base_model
    data.library_name = metadata.library_name
    if base:
        known = as_list(data.base_model)
        data.base_model = base if not known or known == [base] else merge_unique(known, [base])
    if metadata.pipeline_tag and not (metadata.keep_pipeline_tag and data.pipeline_tag):
        data.pipeline_tag = metadata.pipeline_tag
    adapter_tag = [f"base_model:adapter:{base}"] if base and metadata.library_name == "peft" else []
    data.tags = merge_unique(as_list(data.tags), metadata.tags, adapter_tag) or None
    if metadata.datasets:
        data.datasets = merge_unique(as_list(data.datasets), metadata.datasets)
    if metadata.metrics or metadata.results:
        data.metrics = merge_unique(as_list(data.metrics), metadata.metrics, metadata.results)
    task, datasets = metadata.pipeline_tag or data.pipeline_tag, metadata.datasets
    if metadata.results and datasets and task:
        new = [
            EvalResult(
                task_type=task,
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=metric,
                metric_value=value,
            )
            for metric, value in metadata.results.items()
        ]
        replaced = {(r.task_type, r.dataset_type, r.metric_type) for r in new}
        kept = [r for r in (data.eval_results or []) if (r.task_type, r.dataset_type, r.metric_type) not in replaced]
        data.eval_results = kept + new
        data.model_name = data.model_name or title

    card = ModelCard("---\n{}\n---\n")  # an empty metadata block: ModelCard("") warns that it found none
    card.data = data
    card.text = text if text.startswith("\n") else "\n" + text
    return card
