"""Section 3 of ``docs/benchmarks.md`` (accuracy) and its plots, from ``benchmarks/accuracy.py``'s JSON.

Called by :func:`benchmarks.report.render_benchmarks`; the text and tables are ``templates/accuracy.md`` (one
protocol) and ``templates/accuracy_resolution.md`` (the resolutions side by side).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.report import ENV, figure

METHOD_ORDER = ("linear", "full", "lora", "mona", "mona_official")
LOSS_PLOT = "accuracy_loss_{dataset}{suffix}.png"
PARAMS_PLOT = "accuracy_params{suffix}.png"
RESULT_FILES = tuple(f"accuracy{s}.json" for s in ("", "_112", "_pilot112", "_full", "_gpu"))
"""Results rendered, in this order: the 56 px CPU protocol, the 112 px one and its pilot, the GPU protocols."""
TITLES = {"cpu": "## 3. Accuracy", "cpu112": "## 3b. Accuracy at 112 px", "pilot112": "### Pilot of the 112 px budget"}


def _methods(summary: dict[str, Any]) -> list[str]:
    present = summary["methods"]
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def dataset_tables(payload: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What the tables of one dataset need beyond lookups: the methods in order, the bottleneck ablation by size,
    each method's sweep (one run per rate, by rate, padded to the longest) and the validation curves of its chosen
    runs (mean over seeds at the steps all of them have)."""
    summary, bottleneck = payload["summary"][dataset], payload["protocol"]["bottleneck"]
    sweeps, curves, steps = {}, {}, []
    for m in _methods(summary):
        runs = [r for r in payload["runs"] if r["dataset"] == dataset and r["method"] == m]
        sweeps[m] = dict(sorted({r["learning_rate"]: r for r in runs if r["phase"] == "sweep"}.items()))
        chosen = summary["methods"][m]["learning_rate"]
        final = [r for r in runs if r["learning_rate"] == chosen and r["bottleneck"] == bottleneck]
        found = [dict(map(tuple, r.get("validation_curve") or [])) for r in final if not r.get("variant")]
        found = [c for c in found if c]
        if found:
            steps = sorted(set.intersection(*(set(c) for c in found)))
            curves[m] = {"seeds": len(found), "means": [statistics.fmean(c[t] for c in found) for t in steps]}
    width, pad = max(map(len, sweeps.values())), max((len(c["means"]) for c in curves.values()), default=0)
    for c in curves.values():
        c["means"] += [None] * (pad - len(c["means"]))
    return {"methods": _methods(summary), "width": width, "curves": curves, "curve_steps": steps,
            "sweeps": {m: [*s.values()] + [None] * (width - len(s)) for m, s in sweeps.items()},
            "ablation": sorted((summary.get("ablation") or {}).items(), key=lambda kv: int(kv[0]))}  # fmt: skip


def plot_losses(payload: dict[str, Any], dataset: str, path: Path) -> bool:
    """Training loss per step of every method (mean over seeds; thin: raw, thick: moving average)."""
    summary = payload["summary"][dataset]
    curves = {m: summary["methods"][m]["loss_curve"] for m in _methods(summary) if summary["methods"][m]["loss_curve"]}
    if not curves:
        return False
    info, seeds = payload["datasets"][dataset], len(payload["protocol"]["seeds"])
    with figure(payload, path, (8, 4.8)) as (ax,):
        for i, (m, curve) in enumerate(curves.items()):
            steps, window = list(range(1, len(curve) + 1)), max(1, len(curve) // 10)
            smooth = [statistics.fmean(curve[max(0, j - window + 1) : j + 1]) for j in range(len(curve))]
            s = summary["methods"][m]
            ax.plot(steps, curve, color=f"C{i}", alpha=0.25, linewidth=0.8)
            lr = ENV.filters["lr"](s["learning_rate"])
            ax.plot(steps, smooth, color=f"C{i}", linewidth=2, label=f"{s['label']} (LR {lr})")
        title = f"Training loss, {info['description']} ({info['classes']} classes): mean of {seeds} seeds"
        _label(ax, title, "optimizer step", "training cross-entropy", 9)
    return True


def _label(ax: Any, title: str, xlabel: str, ylabel: str, size: int) -> None:
    """Title (at ``size`` points), axis labels, a light grid and a legend a point smaller."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=size - 1)


def plot_params(payload: dict[str, Any], path: Path) -> bool:
    """Test accuracy (mean, seed range as error bars) against trainable parameters, one panel per dataset: the
    paper's opening figure for this protocol."""
    datasets = [d for d in payload["summary"] if payload["summary"][d]["methods"]]
    if not datasets:
        return False
    with figure(payload, path, (5.2 * len(datasets), 4.2), panels=len(datasets), bottom=0.08) as axes:
        for ax, dataset in zip(axes, datasets, strict=True):
            summary = payload["summary"][dataset]
            for i, m in enumerate(_methods(summary)):
                s = summary["methods"][m]
                t = s["test_accuracy"]
                if t.get("n") and s.get("trainable_params"):
                    err = [[t["mean"] - t["min"]], [t["max"] - t["mean"]]]
                    ax.errorbar(s["trainable_params"], t["mean"], yerr=err, fmt="o", color=f"C{i}", capsize=3,
                                label=s["label"])  # fmt: skip
            ax.set_xscale("log")
            title = f"{payload['datasets'][dataset]['description']}, {payload['protocol']['image_size']} px"
            _label(ax, title, "trainable parameters", "test accuracy (mean, seed min–max)", 8)
    return True


def accuracy_section(payload: dict[str, Any], docs: Path) -> str:
    """The markdown of one accuracy protocol's section, writing its plots into ``docs``."""
    name = payload["protocol"]["name"]
    suffix = "" if name == "cpu" else f"_{name}"
    context = {"p": payload, "title": TITLES.get(name, f"## 3. Accuracy (protocol `{name}`)"), "datasets": {}}
    if plot_params(payload, docs / PARAMS_PLOT.format(suffix=suffix)):
        context["params_plot"] = PARAMS_PLOT.format(suffix=suffix)
    for dataset in payload["datasets"]:
        if dataset in payload["summary"] and payload["summary"][dataset]["methods"]:
            plot = LOSS_PLOT.format(dataset=re.sub(r"[^a-z0-9]+", "_", dataset.lower()).strip("_"), suffix=suffix)
            drawn = plot_losses(payload, dataset, docs / plot)
            context["datasets"][dataset] = dataset_tables(payload, dataset) | {"plot": plot if drawn else None}
    return ENV.get_template("accuracy.md").render(context).rstrip() + "\n"


def accuracy_sections(results: Path, docs: Path) -> list[str]:
    """Every accuracy protocol in ``results`` (:data:`RESULT_FILES`), and the resolutions side by side."""
    payloads = [json.loads(path.read_text()) for f in RESULT_FILES if (path := results / f).exists()]
    sections = [accuracy_section(p, docs) for p in payloads]
    cpu = [p for p in payloads if p["protocol"]["name"] in ("cpu", "cpu112")]
    if len(cpu) > 1:  # mean test accuracy of every method at every resolution measured, per dataset
        acc = ENV.filters["acc"]
        rows = [[dataset, cpu[0]["methods"].get(m, m)]
                + [acc(p["summary"].get(dataset, {}).get("methods", {}).get(m, {}).get("test_accuracy")) for p in cpu]
                for dataset in dict.fromkeys(d for p in cpu for d in p["summary"]) for m in METHOD_ORDER]  # fmt: skip
        rows = [row for row in rows if any(cell != "—" for cell in row[2:])]
        sections.append(ENV.get_template("accuracy_resolution.md").render(payloads=cpu, rows=rows))
    return sections
