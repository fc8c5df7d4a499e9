"""Evaluation metrics shipped inside mona_peft, loadable with ``evaluate`` without the Hugging Face Hub.

``evaluate.load("accuracy")`` fetches its metric script from the Hub; the modules here are local copies that
``evaluate.load(path)`` reads from the installed package::

    import evaluate
    from mona_peft.metrics import ACCURACY_PATH

    accuracy = evaluate.load(ACCURACY_PATH)

``MEAN_IOU_PATH`` is the same for semantic segmentation (evaluate's ``mean_iou``), ``COCO_MAP_PATH`` for object
detection (COCO box mAP through pycocotools, the ``detection`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

ACCURACY_PATH = str(Path(__file__).resolve().parent / "accuracy")
"""Directory of the accuracy metric module, for ``evaluate.load(ACCURACY_PATH)``."""
MEAN_IOU_PATH = str(Path(__file__).resolve().parent / "mean_iou")
"""Directory of the mean-IoU (semantic segmentation) metric module, for ``evaluate.load(MEAN_IOU_PATH)``."""
COCO_MAP_PATH = str(Path(__file__).resolve().parent / "coco_map")
"""Directory of the COCO box mAP (object detection, pycocotools) module, for ``evaluate.load(COCO_MAP_PATH)``."""


def load_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` the packaged accuracy metric. Keyword arguments go to ``evaluate.load``; by default the
    metric keeps its state in memory, so concurrent processes (e.g. under ``accelerate launch``) share no files."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(ACCURACY_PATH, **kwargs)


def load_mean_iou(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` the packaged mean-IoU metric (state kept in memory by default, as :func:`load_accuracy`)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(MEAN_IOU_PATH, **kwargs)


def load_coco_map(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` the packaged COCO box mAP metric (state in memory by default, as :func:`load_accuracy`)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(COCO_MAP_PATH, **kwargs)


__all__ = ["ACCURACY_PATH", "COCO_MAP_PATH", "MEAN_IOU_PATH", "load_accuracy", "load_coco_map", "load_mean_iou"]
