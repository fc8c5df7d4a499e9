"""Training curves from a Trainer's log history: training loss and validation accuracy against the step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CURVES_FILE = "training_curves.png"


def curves(log_history: Sequence[dict[str, Any]], metric: str = "eval_accuracy") -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, value)], "eval_loss": [...], metric: [...]}`` from ``trainer.state.log_history``."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], metric: []}
    for entry in log_history:
        for key, points in series.items():
            if key in entry and "step" in entry:
                points.append((int(entry["step"]), float(entry[key])))
    return series


def plot_training_curves(
    log_history: Sequence[dict[str, Any]],
    path: str | Path,
    title: str | None = None,
    metric: str = "eval_accuracy",
    metric_label: str = "validation accuracy",
) -> Path:
    """Write a PNG with the training (and validation) loss on the left and a validation metric in [0, 1] (default:
    accuracy; e.g. ``eval_mean_iou`` for segmentation) on the right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = curves(log_history, metric)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for key, label, style in (("loss", "training loss", "-"), ("eval_loss", "validation loss", "o--")):
        if series[key]:
            steps, values = zip(*series[key], strict=True)
            loss_ax.plot(steps, values, style, label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend(loc="best")
    loss_ax.grid(alpha=0.3)
    if series[metric]:
        steps, values = zip(*series[metric], strict=True)
        acc_ax.plot(steps, values, "o-", color="tab:green")
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel(metric_label)
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
