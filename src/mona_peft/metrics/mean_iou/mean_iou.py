"""Mean intersection-over-union for semantic segmentation, as an ``evaluate`` metric module shipped in mona_peft.

``evaluate.load("mean_iou")`` downloads its script from the Hugging Face Hub; this module lets
``evaluate.load(mona_peft.metrics.MEAN_IOU_PATH)`` work offline. It takes the same arguments and returns the same keys
as evaluate's ``mean_iou`` metric. The counts are accumulated over the whole set (one confusion of areas per class,
not a mean of per-image scores), as in mmsegmentation and in the ADE20K benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
IoU of a class is the area of overlap between the predicted and the reference segmentation of that class divided by
the area of their union, summed over all images. Mean IoU averages it over the classes that occur in the predictions
or references (a class with an empty union is NaN and left out of the mean).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D `np.ndarray`): Predicted class index per pixel, one map per image.
    references (`list` of 2D `np.ndarray`): Reference class index per pixel, same shapes as the predictions.
    num_labels (`int`): Number of classes; reference values outside [0, num_labels) other than `ignore_index` are an
        error.
    ignore_index (`int`): Reference value of pixels that do not count (e.g. 255 for "unlabelled").
    nan_to_num (`float`, *optional*): Replace NaN per-class scores (classes absent from both sides) by this value.
    label_map (`dict[int, int]`, *optional*): Remap reference values before scoring (`{old: new}`).
    reduce_labels (`bool`, defaults to `False`): ADE20K convention: reference 0 (background) becomes `ignore_index`
        and every other class moves down by one.

Returns:
    mean_iou (`float`): Mean IoU over the classes with a non-empty union.
    mean_accuracy (`float`): Mean over the classes present in the references of the fraction of their pixels
        predicted correctly.
    overall_accuracy (`float`): Fraction of all counted pixels predicted correctly.
    per_category_iou (`np.ndarray`): IoU per class (NaN where the union is empty).
    per_category_accuracy (`np.ndarray`): Accuracy per class (NaN where the class is absent from the references).

Example:
    >>> import evaluate, numpy as np, mona_peft.metrics
    >>> mean_iou = evaluate.load(mona_peft.metrics.MEAN_IOU_PATH)
    >>> result = mean_iou.compute(predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [0, 1]])],
    ...                           num_labels=2, ignore_index=255)
    >>> round(result["mean_iou"], 4)  # class 0: 1/2, class 1: 2/3
    0.5833
"""

_CITATION = ""


def area_counts(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_labels: int,
    ignore_index: int,
    label_map: dict[int, int] | None = None,
    reduce_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (intersection, union, predicted area, reference area) in pixels for one image."""
    prediction = np.asarray(prediction)
    reference = np.asarray(reference).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"mean_iou needs a prediction of the same shape as its reference, got {prediction.shape} and "
            f"{reference.shape}"
        )
    if label_map:
        remapped = reference.copy()
        for old, new in label_map.items():
            remapped[reference == old] = new
        reference = remapped
    if reduce_labels:
        reference = np.where(reference == 0, ignore_index, reference - 1)
        reference = np.where(reference == ignore_index - 1, ignore_index, reference)
    counted = reference != ignore_index
    reference = reference[counted]
    prediction = prediction[counted].astype(np.int64)
    bad = (reference < 0) | (reference >= num_labels)
    if bad.any():
        raise ValueError(
            f"mean_iou got reference value(s) {sorted(set(reference[bad].tolist()))[:5]} outside [0, {num_labels}) "
            f"that are not ignore_index={ignore_index}"
        )
    predicted_bad = (prediction < 0) | (prediction >= num_labels)
    if predicted_bad.any():
        raise ValueError(f"mean_iou got predicted class(es) outside [0, {num_labels})")
    hits = reference[prediction == reference]
    intersection = np.bincount(hits, minlength=num_labels)
    predicted_area = np.bincount(prediction, minlength=num_labels)
    reference_area = np.bincount(reference, minlength=num_labels)
    union = predicted_area + reference_area - intersection
    return intersection, union, predicted_area, reference_area


def mean_iou(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    num_labels: int,
    ignore_index: int,
    nan_to_num: float | None = None,
    label_map: dict[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict[str, Any]:
    """The metric itself (see the module's description), usable without ``evaluate``."""
    if len(predictions) != len(references):
        raise ValueError(
            f"mean_iou needs as many predictions as references, got {len(predictions)} and {len(references)}"
        )
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"mean_iou needs a positive num_labels, got {num_labels!r}")
    totals = np.zeros((4, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references, strict=True):
        totals += np.stack(area_counts(prediction, reference, num_labels, ignore_index, label_map, reduce_labels))
    intersection, union, _, reference_area = totals
    if reference_area.sum() == 0:
        raise ValueError("mean_iou is undefined when no reference pixel is counted (all pixels are ignore_index)")
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
        accuracy = np.where(reference_area > 0, intersection / np.maximum(reference_area, 1), np.nan)
    metrics: dict[str, Any] = {
        "mean_iou": float(np.nanmean(iou)),
        "mean_accuracy": float(np.nanmean(accuracy)),
        "overall_accuracy": float(intersection.sum() / reference_area.sum()),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if nan_to_num is not None:
        metrics = {k: np.nan_to_num(v, nan=nan_to_num) if isinstance(v, np.ndarray) else v for k, v in metrics.items()}
    return metrics


_FEATURES = datasets.Features(
    {
        "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    }
)
_URL = "https://huggingface.co/spaces/evaluate-metric/mean_iou"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """Mean IoU for semantic segmentation (offline counterpart of evaluate's ``mean_iou`` metric)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(_DESCRIPTION, _CITATION, _FEATURES, _KWARGS_DESCRIPTION, reference_urls=[_URL])

    def _compute(self, predictions: Sequence[Any], references: Sequence[Any], **options: Any) -> dict[str, Any]:
        """``options``: :func:`mean_iou`'s ``num_labels``, ``ignore_index``, ``nan_to_num``, ``label_map``,
        ``reduce_labels``."""
        return mean_iou([np.asarray(p) for p in predictions], [np.asarray(r) for r in references], **options)
