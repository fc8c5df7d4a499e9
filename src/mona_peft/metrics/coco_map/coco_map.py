"""COCO box mAP through ``pycocotools``, as an ``evaluate`` metric module shipped in mona_peft.

The average precision is pycocotools' own (``COCOeval`` on the ``bbox`` task); this module only turns lists of boxes
into its ground-truth and result structures and reads the per-class AP out of its accumulated precision table (as
detectron2 does). Needs the ``detection`` extra (``pip install "mona-peft[detection]"``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
COCO average precision of boxes: mAP (AP averaged over IoU thresholds 0.50:0.05:0.95, up to 100 detections per
image), mAP@50 and mAP@75, and the AP of every class at 0.50:0.95. Computed by pycocotools' COCOeval.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`): One per image: `boxes` (`[x, y, width, height]` in pixels, COCO format),
        `scores` and `labels` (class ids in [0, num_labels)).
    references (`list` of `dict`): One per image, same order: `boxes` and `labels` of the true objects.
    num_labels (`int`): Number of classes.

Returns:
    map, map_50, map_75 (`float`): COCO mAP, mAP at IoU 0.5, mAP at IoU 0.75 (0.0 when there is no detection at all).
    per_class_ap (`np.ndarray`): AP (0.50:0.95) per class; NaN for a class with no true object.

Example:
    >>> import evaluate, mona_peft.metrics
    >>> coco_map = evaluate.load(mona_peft.metrics.COCO_MAP_PATH)
    >>> truth = {"boxes": [[10, 10, 20, 20]], "labels": [0]}
    >>> result = coco_map.compute(predictions=[{**truth, "scores": [0.9]}], references=[truth], num_labels=1)
    >>> round(result["map"], 4)
    1.0
"""

_CITATION = ""


def coco_map(predictions: Sequence[dict], references: Sequence[dict], num_labels: int) -> dict[str, Any]:
    """The metric itself (see the module's description), usable without ``evaluate``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(references):
        raise ValueError(f"coco_map needs one prediction per reference, got {len(predictions)} and {len(references)}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"coco_map needs a positive num_labels, got {num_labels!r}")
    truth: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    for image_id, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        for box, label in zip(reference["boxes"], reference["labels"], strict=True):
            _check(box, label, num_labels, "reference")
            x, y, w, h = (float(v) for v in box)
            truth.append(
                {
                    "id": len(truth) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, label, score in zip(prediction["boxes"], prediction["labels"], prediction["scores"], strict=True):
            _check(box, label, num_labels, "predicted")
            found.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    if not truth:
        raise ValueError("coco_map is undefined without any reference box")
    ground = COCO()
    ground.dataset = {
        "images": [{"id": i} for i in range(len(references))],
        "annotations": truth,
        "categories": [{"id": c} for c in range(num_labels)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        ground.createIndex()
        if not found:
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "per_class_ap": _absent_as_nan(ground, num_labels, 0.0)}
        evaluation = COCOeval(ground, ground.loadRes(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision[iou threshold, recall, class, area range, max detections]; -1 where a class has no true object
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class = np.array(
        [np.mean(p[p > -1]) if (p > -1).any() else np.nan for p in np.moveaxis(precision, 2, 0)], dtype=np.float64
    )
    stats = evaluation.stats
    return {"map": float(stats[0]), "map_50": float(stats[1]), "map_75": float(stats[2]), "per_class_ap": per_class}


def _absent_as_nan(ground: Any, num_labels: int, value: float) -> np.ndarray:
    present = {a["category_id"] for a in ground.dataset["annotations"]}
    return np.array([value if c in present else np.nan for c in range(num_labels)], dtype=np.float64)


def _check(box: Sequence[float], label: int, num_labels: int, what: str) -> None:
    if len(box) != 4:
        raise ValueError(f"coco_map needs [x, y, width, height] boxes, got a {what} box {list(box)}")
    if not 0 <= int(label) < num_labels:
        raise ValueError(f"coco_map got a {what} class {label} outside [0, {num_labels})")


def _boxes() -> dict[str, Any]:
    return {
        "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
        "labels": datasets.Sequence(datasets.Value("int64")),
    }


_FEATURES = datasets.Features(
    {"predictions": {**_boxes(), "scores": datasets.Sequence(datasets.Value("float64"))}, "references": _boxes()}
)
_URL = "https://github.com/ppwwyyxx/cocoapi"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoMap(evaluate.Metric):
    """COCO box mAP (pycocotools) for object detection."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(_DESCRIPTION, _CITATION, _FEATURES, _KWARGS_DESCRIPTION, reference_urls=[_URL])

    def _compute(self, predictions: Sequence[dict], references: Sequence[dict], num_labels: int) -> dict[str, Any]:
        return coco_map(predictions, references, num_labels)
