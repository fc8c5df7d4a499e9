"""Render ``docs/benchmarks.md`` (params, speed, accuracy), ``docs/profile.md`` and their plots (``docs/*.png``)
from ``benchmarks/results/``.

    python -m benchmarks.report                       # after params / speed / profile_mona have written their JSON
    python -m benchmarks.report --results-dir DIR --docs-dir DIR

Only the files present are rendered; nothing is measured here. The pages are Jinja templates in
``benchmarks/templates/`` (prose, tables, number formats); this module loads the JSON, computes the few values that
are not lookups, draws the plots and writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import re
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jinja2

from benchmarks import profile_mona
from benchmarks.common import DOCS_DIR, RESULTS_DIR
from benchmarks.speed import METHOD_LABELS

FAMILIES = {"swin": ("Swin", "tab:blue"), "vit": ("ViT", "tab:orange"), "dinov2": ("DINOv2", "tab:green")}


def _acc(stat: dict[str, Any] | None) -> str:
    """An accuracy over seeds: mean ± sample std [min–max]; the mean alone with one seed (no spread to show)."""
    if not stat or not stat.get("n"):
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.3f} (1 seed)"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} [{stat['min']:.3f}–{stat['max']:.3f}]"


def _ratio(r: dict[str, Any] | None) -> str:
    """A paired ratio: median [min–max] over rounds."""
    return f"{r['median']:.3f} [{r['min']:.3f}–{r['max']:.3f}]" if r and r.get("n") else "—"


def _stat(s: dict[str, Any] | None, spec: str = ".2f") -> str:
    """A timing or memory statistic: median [interquartile range]."""
    return f"{s['median']:{spec}} [{s['q1']:{spec}}–{s['q3']:{spec}}]" if s and s.get("n") else "—"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    undefined=jinja2.ChainableUndefined,  # a missing key reads as empty, so optional parts test with {% if %}
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENV.filters |= {"f": format, "acc": _acc, "ratio": _ratio, "stat": _stat}
ENV.filters |= {"lr": lambda v: "—" if v is None else f"{v:.1e}".replace("e-0", "e-")}
ENV.filters |= {"count": lambda n, share: f"{n:,} ({share:.2%})", "mib": lambda n: f"{n / 2**20:.1f} MiB"}
ENV.filters |= {"code": lambda names: ", ".join(f"`{x}`" for x in names)}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def figure(
    payload: dict[str, Any], path: Path, size: tuple[float, float], panels: int = 1, bottom: float = 0.07
) -> Iterator[list[Any]]:
    """A row of ``panels`` axes (yielded as a list), saved to ``path`` with a footer naming the machine and command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    yield list(axes[0])
    m = payload["machine"]
    threads = payload.get("settings", {}).get("threads_per_worker", m.get("torch_threads"))
    text = f"{m.get('gpu') or m.get('cpu')} · {m.get('logical_cores')} cores, {threads} torch thread"
    text += f"{'' if threads == 1 else 's'} · torch {m.get('torch')} · {m.get('date')}\n{m.get('command')}"
    fig.text(0.01, 0.005, text, fontsize=6.5, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- params and speed


def mona_at(model: dict[str, Any], bottleneck: int) -> dict[str, Any]:
    """A model's Mona row (params, share, file size) at ``bottleneck``; empty if not counted there."""
    return next((r for r in model["mona"] if r["bottleneck"] == bottleneck), {})


def _families(params: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    families: dict[str, list[dict[str, Any]]] = {}
    for m in params["models"]:
        families.setdefault(m["family"], []).append(m)
    return {k: sorted(v, key=lambda m: m["backbone_params"]) for k, v in families.items()}


def share_trend(params: dict[str, Any], m: int = 64) -> dict[str, list[str]]:
    """Neighbours in size within each family whose Mona share at bottleneck ``m`` falls, and those where it rises."""
    pairs: dict[str, list[str]] = {"falls": [], "rises": []}
    for small, big in (p for models in _families(params).values() for p in itertools.pairwise(models)):
        a, b = mona_at(small, m).get("share_of_backbone"), mona_at(big, m).get("share_of_backbone")
        if a is not None and b is not None:
            pairs["falls" if b < a else "rises"].append(f"{small['name']} → {big['name']} ({a:.2%} → {b:.2%})")
    return pairs


def _plot_params(params: dict[str, Any], path: Path) -> None:
    bottlenecks = params["settings"]["bottlenecks"]
    b_min, b_max = min(bottlenecks), max(bottlenecks)
    with figure(params, path, (8, 4.8), bottom=0.06) as (ax,):
        for family, models in _families(params).items():
            label, colour = FAMILIES.get(family, (family, "tab:gray"))
            x = [m["backbone_params"] / 1e6 for m in models]
            share = [100 * mona_at(m, 64)["share_of_backbone"] for m in models]
            if 64 in bottlenecks:
                ax.plot(x, share, "o-", color=colour, label=f"{label}: Mona m=64")
            if len(bottlenecks) > 1:
                low, high = ([100 * mona_at(m, b)["share_of_backbone"] for m in models] for b in (b_min, b_max))
                ax.fill_between(x, low, high, color=colour, alpha=0.12, lw=0)
            lora = [100 * m["lora"]["share_of_backbone"] for m in models]
            ax.plot(x, lora, "s--", color=colour, alpha=0.7, ms=4, label=f"{label}: LoRA r=16 q/v")
            offset = (4, -11) if family == "dinov2" else (4, 4)  # DINOv2-B sits on ViT-B
            for xi, yi, m in zip(x, share, models, strict=True):
                ax.annotate(m["name"], (xi, yi), xytext=offset, textcoords="offset points", fontsize=7)
        band = f"; band: m={b_min}–{b_max}" if len(bottlenecks) > 1 else ""
        ax.set(xscale="log", xlabel="backbone parameters (millions, log scale)")
        ax.set(ylabel="adapter parameters, % of backbone")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Trainable share of the backbone (Mona solid{band}; LoRA dashed)", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)


def _ordered(*groups: Iterable[str]) -> list[str]:
    """The methods named in ``groups``, once each, in speed.py's order of methods."""
    order = list(METHOD_LABELS)
    key = lambda m: (order.index(m.split("+")[0]) if m.split("+")[0] in order else 99, m)  # noqa: E731
    return sorted(dict.fromkeys(itertools.chain(*groups)), key=key)


SIDE_RUNS = ("targets", "filter-backward")  # speed runs kept beside the main one (see templates/speed.md)


def render_benchmarks(results: Path, docs: Path) -> Path | None:
    """Write ``docs/benchmarks.md`` (and its plots) from what ``results`` holds; None if it holds nothing."""
    params, speed, profile = (_load(results / f"{name}.json") for name in ("params", "speed", "profile"))
    if params is None and speed is None and not (results / "accuracy.json").exists():
        return None
    docs.mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {"params": params, "speed": speed, "profile": profile, "mona_at": mona_at}
    # the pages of side runs rendered under this one (--docs-dir docs/<name>), which the speed section links to
    context["side_runs"] = {name for name in SIDE_RUNS if (docs / name / "benchmarks.md").exists()}
    if params is not None:
        _plot_params(params, docs / "params_share.png")
        context["trend"] = share_trend(params)
    if speed is not None:
        configs, labels = speed["configs"], speed["settings"]["method_labels"]
        loads = [c[k][0] for c in configs for k in ("load_average_before", "load_average_after") if c.get(k)]
        context |= {"label": lambda m: labels.get(m, m), "ordered": _ordered, "loads": loads}
    text = ENV.get_template("benchmarks.md").render(context)
    path = docs / "benchmarks.md"
    path.write_text("\n".join([text, *accuracy_sections(results, docs)]).rstrip() + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ accuracy


METHOD_ORDER = ("linear", "full", "lora", "mona", "mona_official")
LOSS_PLOT = "accuracy_loss_{dataset}{suffix}.png"
PARAMS_PLOT = "accuracy_params{suffix}.png"
RESULT_FILES = tuple(f"accuracy{s}.json" for s in ("", "_112", "_pilot112", "_gpu224", "_gpu"))
"""Results rendered, in this order: the 56 px CPU protocol, the 112 px one and its pilot, 224 px at the 112 px rates,
the GPU protocol."""
TITLES = {"cpu": "## 3. Accuracy", "cpu112": "## 3b. Accuracy at 112 px", "pilot112": "### Pilot of the 112 px budget",
          "gpu224": "## 3c. Accuracy at 224 px (on a GPU, at the rates chosen at 112 px)"}  # fmt: skip
RESOLUTIONS = ("cpu", "cpu112", "gpu224")
"""The protocols of the by-resolution table: the same images, recipe, steps and seeds at 56, 112 and 224 px."""


def fixed_rates(payload: dict[str, Any]) -> bool:
    """Whether the protocol trained every method it ran at one given rate (no sweep), as ``gpu224`` does."""
    grids = [grid for m, grid in payload["protocol"]["lr_grids"].items() if m in payload["methods"]]
    return bool(grids) and max(map(len, grids)) == 1


ENV.tests["fixed_rates"] = fixed_rates


def _methods(summary: dict[str, Any]) -> list[str]:
    present = summary["methods"]
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def dataset_tables(payload: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What the tables of one dataset need beyond lookups: the methods in order, the bottleneck ablation by size,
    each method's sweep (one run per rate, by rate, padded to the longest), the validation curves of its chosen runs
    (mean over seeds at the steps all of them have) and, for full fine-tuning, how its last evaluation interval
    moved (``plateau``: the steps, the means, how many seeds rose, one binomial standard error of a run)."""
    summary, bottleneck = payload["summary"][dataset], payload["protocol"]["bottleneck"]
    sweeps, curves, plateau = {}, {}, None
    n = payload["datasets"][dataset]["sizes"].get("validation") or 0
    for m in _methods(summary):
        runs = [r for r in payload["runs"] if r["dataset"] == dataset and r["method"] == m]
        sweeps[m] = dict(sorted({r["learning_rate"]: r for r in runs if r["phase"] == "sweep"}.items()))
        chosen = summary["methods"][m]["learning_rate"]
        final = [r for r in runs if r["learning_rate"] == chosen and r["bottleneck"] == bottleneck]
        found = [dict(map(tuple, r.get("validation_curve") or [])) for r in final if not r.get("variant")]
        found = [c for c in found if c]
        if not found:
            continue
        steps = sorted(set.intersection(*(set(c) for c in found)))
        curves[m] = {
            "seeds": len(found),
            "steps": steps,
            "means": [statistics.fmean(c[t] for c in found) for t in steps],
        }
        if m == "full" and len(steps) > 1 and n:
            last, before = steps[-1], steps[-2]
            p = curves[m]["means"][-1]
            plateau = {"steps": [before, last], "means": curves[m]["means"][-2:], "validation_images": n,
                       "rose": sum(c[last] > c[before] for c in found), "seeds": len(found),
                       "standard_error": math.sqrt(p * (1 - p) / n)}  # fmt: skip
    width = max(map(len, sweeps.values()))
    curve_steps = max((c["steps"] for c in curves.values()), key=len, default=[])
    for c in curves.values():
        c["means"] += [None] * (len(curve_steps) - len(c["means"]))
    return {"methods": _methods(summary), "width": width, "curves": curves, "curve_steps": curve_steps,
            "sweeps": {m: [*s.values()] + [None] * (width - len(s)) for m, s in sweeps.items()},
            "ablation": sorted((summary.get("ablation") or {}).items(), key=lambda kv: int(kv[0])),
            "plateau": plateau}  # fmt: skip


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
    cpu = [p for p in payloads if p["protocol"]["name"] in RESOLUTIONS]
    if len(cpu) > 1:  # mean test accuracy of every method at every resolution measured, per dataset
        acc = ENV.filters["acc"]
        rows = [[dataset, cpu[0]["methods"].get(m, m)]
                + [acc(p["summary"].get(dataset, {}).get("methods", {}).get(m, {}).get("test_accuracy")) for p in cpu]
                for dataset in dict.fromkeys(d for p in cpu for d in p["summary"]) for m in METHOD_ORDER]  # fmt: skip
        rows = [row for row in rows if any(cell != "—" for cell in row[2:])]
        sections.append(ENV.get_template("accuracy_resolution.md").render(payloads=cpu, rows=rows))
    return sections


# ------------------------------------------------------------------------------------------------------- profile


def _ms(stages: dict[str, dict[str, float]], *names: str) -> float:
    """Forward + backward milliseconds of the named stages (of all of them without names)."""
    return sum(v["forward_ms"] + v["backward_ms"] for k, v in stages.items() if not names or k in names)


def _plot_module(profile: dict[str, Any], path: Path) -> None:
    stages, s = profile["module"]["train"]["stages"], profile["module"]["shape"]
    with figure(profile, path, (8.5, 4.2)) as (ax,):
        ys, fwd = list(range(len(stages)))[::-1], [v["forward_ms"] for v in stages.values()]
        ax.barh(ys, fwd, label="forward")
        ax.barh(ys, [v["backward_ms"] for v in stages.values()], left=fwd, label="backward")
        ax.set_yticks(ys)
        ax.set_yticklabels(list(stages), fontsize=8)
        ax.set_xlabel("ms (median over profiled iterations)")
        shape = f"x [{s['batch']}, {s['prefix'] + s['grid'] ** 2}, {s['hidden']}], m={s['bottleneck']}"
        ax.set_title(f"One Mona module, train step: {shape}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)


def render_profile(results: Path, docs: Path) -> Path | None:
    """Write ``docs/profile.md`` and its plot from ``profile.json`` (with ``speed.json`` if there); None without."""
    profile = _load(results / "profile.json")
    if profile is None:
        return None
    docs.mkdir(parents=True, exist_ok=True)
    _plot_module(profile, docs / "profile_module.png")
    copies = profile["module"]["train"].get("copy_parents", {})
    context = {"profile": profile, "speed": _load(results / "speed.json"), "figure": "profile_module.png"}
    context |= {"S": profile_mona, "ms": _ms, "copy_conv": _ms({k: v for k, v in copies.items() if "conv" in k})}
    path = docs / "profile.md"
    path.write_text(ENV.get_template("profile.md").render(context).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Render every page whose results are present."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR)
    args = parser.parse_args(argv)
    for render in (render_benchmarks, render_profile):
        if (path := render(args.results_dir, args.docs_dir)) is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
