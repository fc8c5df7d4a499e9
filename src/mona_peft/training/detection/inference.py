"""Predicting with a detector trained by ``scripts/train_detection.py``: boxes, labels and scores in pixels of the
original images, and the boxes drawn on them. Loaded through :func:`mona_peft.training.load_trained`, which tells a
detector from a classifier by its saved config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from PIL import ImageDraw
from torch import nn

from ..data import load_image
from .data import DetectionPreprocessing
from .model import METADATA_FILE, load_trained_detector

ImageInput = str | Path | PILImage.Image
DEFAULT_THRESHOLD = 0.5
MAX_DETECTIONS = 100
"""Detections kept per image by default (COCO's limit)."""


@dataclass(frozen=True)
class Detection:
    """One detected object: its class name, score, and box ``(xmin, ymin, xmax, ymax)`` in pixels of the image."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "box": list(self.box)}


@dataclass
class TrainedDetector:
    """A fine-tuned detector with its preprocessing, label names and post-processing.

    ``preprocessing`` is the training run's eval transform (``detection.json``: resize to a square, normalise); when
    it is ``None`` (a detector saved elsewhere, with a ``preprocessor_config.json``), ``processor`` preprocesses too.
    ``processor`` is the detector's transformers image processor, whose ``post_process_object_detection`` decodes
    the outputs (sigmoid top-k for Deformable DETR, softmax for DETR). The mAP metric of training decodes the same way
    but with its own :func:`~mona_peft.training.detection.task.decode` (every top-100 detection, no threshold, COCO
    boxes in the model input's frame, from bare arrays); ``tests/test_predict_detection.py`` keeps the two in step."""

    model: nn.Module
    processor: Any
    id2label: dict[int, str]
    preprocessing: DetectionPreprocessing | None = None

    def _inputs(self, images: list[PILImage.Image]) -> dict[str, torch.Tensor]:
        if self.preprocessing is None:
            return dict(self.processor(images=images, return_tensors="pt"))
        no_objects = {"bbox": [], "category": []}
        pixels = [self.preprocessing.example(image, no_objects)["pixel_values"] for image in images]
        return {"pixel_values": torch.stack(pixels)}

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[ImageInput],
        threshold: float = DEFAULT_THRESHOLD,
        top_k: int = MAX_DETECTIONS,
        batch_size: int = 8,
    ) -> list[list[Detection]]:
        """The detections of each image (PIL images or file paths) scoring above ``threshold``, at most ``top_k``,
        best first, with boxes in pixels of the image (clipped to it)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        results: list[list[Detection]] = []
        for start in range(0, len(images), batch_size):
            chunk = [
                (img if isinstance(img, PILImage.Image) else load_image(img)).convert("RGB")
                for img in images[start : start + batch_size]
            ]
            inputs = {k: v.to(device) for k, v in self._inputs(chunk).items()}
            outputs = self.model(**inputs)
            sizes = [(image.height, image.width) for image in chunk]
            decoded = self.processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
            results += [self._detections(found, size, top_k) for found, size in zip(decoded, sizes, strict=True)]
        return results

    def _detections(self, found: dict[str, torch.Tensor], size: tuple[int, int], top_k: int) -> list[Detection]:
        height, width = size
        limits = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(found["boxes"].float().cpu().clamp(min=0), limits)
        order = found["scores"].float().cpu().argsort(descending=True, stable=True)[:top_k]
        return [
            Detection(
                self.id2label[int(found["labels"][i])],
                float(found["scores"][i]),
                tuple(round(float(v), 2) for v in boxes[i]),  # type: ignore[arg-type]
            )
            for i in order.tolist()
        ]


def draw_detections(image: PILImage.Image, detections: Sequence[Detection], width: int = 2) -> PILImage.Image:
    """A copy of ``image`` (RGB) with each box outlined and labelled ``"label score"`` (the best on top)."""
    drawn = image.convert("RGB")
    draw = ImageDraw.Draw(drawn)
    palette = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (255, 225, 25))
    for detection in reversed(detections):
        colour = palette[sum(map(ord, detection.label)) % len(palette)]
        draw.rectangle(detection.box, outline=colour, width=width)
        text = f"{detection.label} {detection.score:.2f}"
        left, top = detection.box[0], max(0.0, detection.box[1] - 11)
        draw.rectangle(draw.textbbox((left, top), text), fill=colour)
        draw.text((left, top), text, fill=(255, 255, 255))
    return drawn


def postprocessor(config: Any) -> Any:
    """The transformers image processor of ``config``'s detector type (its PIL version), for its
    ``post_process_object_detection``."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES[config.model_type]
    name = names["pil"] if isinstance(names, dict) else names[0]  # transformers 5: by backend; 4.x: (slow, fast)
    return getattr(transformers, name)()


def load_detector_for_prediction(directory: str | Path, config: Any) -> TrainedDetector:
    """A :class:`TrainedDetector` from a local directory: a ``scripts/train_detection.py`` output (adapter or full
    model, with ``detection.json``), or a full detector with its ``preprocessor_config.json``."""
    from ..recipe import load_image_processor

    directory = Path(directory)
    model = load_trained_detector(directory)
    id2label = {int(k): v for k, v in config.id2label.items()}
    metadata = directory / METADATA_FILE
    if not metadata.is_file():
        processor = load_image_processor(str(directory))
        return TrainedDetector(model, processor, id2label)
    meta = json.loads(metadata.read_text())
    preprocessing = DetectionPreprocessing(meta["image_size"], tuple(meta["image_mean"]), tuple(meta["image_std"]))
    return TrainedDetector(model, postprocessor(config), id2label, preprocessing)
