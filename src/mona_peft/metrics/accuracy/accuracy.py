"""Accuracy as an ``evaluate`` metric module shipped inside mona_peft.

``evaluate.load("accuracy")`` downloads its script from the Hugging Face Hub; this copy lets
``evaluate.load(mona_peft.metrics.ACCURACY_PATH)`` work offline. It computes the same quantity as evaluate's own
accuracy metric (the fraction, or with ``normalize=False`` the count or total weight, of exact matches) with numpy
instead of scikit-learn.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (number of predictions equal to their reference) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground-truth labels.
    normalize (`bool`, defaults to `True`): If `False`, return the number (or, with `sample_weight`, the total
        weight) of correct predictions instead of their fraction.
    sample_weight (`list` of `float`, *optional*): Per-example weights; `None` weighs every example equally.

Returns:
    accuracy (`float` or `int`): Between 0 and 1 when `normalize=True` (1 is best).

Example:
    >>> import evaluate, mona_peft.metrics
    >>> accuracy = evaluate.load(mona_peft.metrics.ACCURACY_PATH)
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_URL = "https://huggingface.co/spaces/evaluate-metric/accuracy"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Classification accuracy (offline copy of evaluate's ``accuracy`` metric)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(_DESCRIPTION, _CITATION, _FEATURES, _KWARGS_DESCRIPTION, reference_urls=[_URL])

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"accuracy needs as many predictions as references, got {predictions.shape} and {references.shape}"
            )
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {correct.shape}")
        total = float(np.sum(correct * weights))
        if not normalize:
            return {"accuracy": total if sample_weight is not None else int(total)}
        if weights.sum() == 0:
            raise ValueError("accuracy is undefined for an empty set of predictions (or all-zero sample weights)")
        return {"accuracy": total / float(weights.sum())}
