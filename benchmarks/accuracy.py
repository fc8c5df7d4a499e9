"""Accuracy: linear probe, full fine-tuning, LoRA and Mona (both inits) on real pretrained weights, same recipe.

Every run goes through the package's own training pipeline (``mona_peft.training``: the same ``RecipeTrainer``, AdamW
with the recipe's weight-decay groups and separate head learning rate, warm-up + cosine, gradient clipping and
augmentation for every method); only the method and its learning rate change. The protocol, per dataset:

1. learning-rate sweep: each method at a few peak learning rates around its recipe default, one seed, picked by
   validation accuracy (ties: the lower validation loss);
2. seeds: the chosen learning rate with every seed (the sweep's run is the first seed), test accuracy mean ± std;
3. bottleneck ablation: Mona (default init) at its chosen learning rate with the other bottleneck widths.

The training loss of every step is recorded for the convergence chart. The backbone is the offline DINOv2-small
(``mona_peft.offline.ensure_dinov2_small``) unless ``--model`` says otherwise.

    python -m benchmarks.accuracy              # CPU protocol (< 1 h on 2 idle cores), or the GPU one if CUDA is there
    python -m benchmarks.accuracy --full       # the full-size protocol (224 px, all images, longer), for a GPU
    python -m benchmarks.accuracy --quick      # a few seconds; the smoke test adds --model/--datasets of its own
    python -m benchmarks.report                # renders docs/benchmarks.md and docs/accuracy_loss_*.png

Results: ``benchmarks/results/accuracy.json`` (``accuracy_quick.json`` with ``--quick``), written after every run;
``--resume`` skips the runs that file already holds (same protocol).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import pickle
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mona_peft  # noqa: F401  (registers the "mona" PEFT method)
from benchmarks.common import RESULTS_DIR, machine_info, write_results

# ----------------------------------------------------------------------------------------------------- the protocol

METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "label": "Linear probe"},
    "full": {"method": "full", "label": "Full fine-tuning"},
    "lora": {"method": "lora", "label": "LoRA r16 (q, v)"},
    "mona": {"method": "mona", "init": True, "label": "Mona (zero-init up-projection)"},
    "mona_official": {"method": "mona", "init": "official", "label": "Mona (official init)"},
}
"""The compared methods: the key in the results, the training method of ``mona_peft.training`` and Mona's
``init_weights``."""

LR_GRIDS: dict[str, tuple[float, ...]] = {
    "linear": (1.5e-3, 5e-3, 1.5e-2),
    "full": (3e-6, 1e-5, 3e-5),
    "lora": (3e-4, 1e-3, 3e-3),
    "mona": (3e-5, 1e-4, 3e-4),
    "mona_official": (3e-5, 1e-4, 3e-4),
}
"""Peak learning rates of the sweep: the recipe default of each method (``DEFAULT_LEARNING_RATES``) and a factor 3
either side. The new head trains at the recipe's head learning rate (1e-3) in every method but the linear probe,
where the head is all that trains and follows the swept rate."""


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

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def run_settings(self) -> dict[str, Any]:
        """The fields that decide what one run (dataset, method, rate, seed, bottleneck) gives; the others (grids,
        seeds, ablation widths, extensions) only decide which runs the suite does, so ``--resume`` can keep runs
        across a change of those."""
        keys = ("name", "image_size", "max_steps", "epochs", "batch_size", "max_train_samples", "max_eval_samples")
        return {k: getattr(self, k) for k in keys}


PILOT_STEPS = 160
"""Steps of the 112 px protocol, fixed from the pilot before its runs (docs/benchmarks.md shows the pilot's curve)."""

PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol(
        name="cpu",
        image_size=56,
        max_steps=80,
        batch_size=16,
        max_train_samples=640,
        max_eval_samples=300,
        seeds=(0, 1, 2),
        bottleneck=64,
        ablation_bottlenecks=(32, 64, 128),
        note="sized for < 1 h on two idle CPU cores: 56 px (a 4 x 4 patch grid), 640 training images (2 epochs of "
        "80 steps at batch 16), at most 300 validation and 300 test images",
    ),
    "full": Protocol(
        name="full",
        image_size=224,
        max_steps=1000,
        batch_size=16,
        max_train_samples=None,
        max_eval_samples=None,
        seeds=(0, 1, 2),
        bottleneck=64,
        ablation_bottlenecks=(32, 64, 128),
        note="full-size protocol for a GPU: 224 px (16 x 16 patches), every image, 1,000 steps at batch 16",
    ),
    "cpu112": Protocol(
        name="cpu112",
        image_size=112,
        max_steps=PILOT_STEPS,
        batch_size=16,
        max_train_samples=640,
        max_eval_samples=300,
        seeds=(0, 1, 2),
        bottleneck=64,
        ablation_bottlenecks=(),
        eval_steps=40,
        note="the CPU protocol at 112 px (an 8 x 8 patch grid, where Mona's 5 x 5 and 7 x 7 filters have room): "
        "the same images, grids, seeds and rules; the step budget set by the pilot (`--protocol pilot112`); "
        "validation accuracy every 40 steps; several hours on 2 cores, run in parts with --resume",
    ),
    "pilot112": Protocol(
        name="pilot112",
        image_size=112,
        max_steps=400,
        batch_size=16,
        max_train_samples=640,
        max_eval_samples=300,
        seeds=(0,),
        bottleneck=64,
        ablation_bottlenecks=(),
        lr_grids={**LR_GRIDS, "full": (1e-5,)},
        grid_extensions=0,
        eval_steps=40,
        note="pilot of the 112 px budget: full fine-tuning at its 56 px rate on Animal-MNIST for 400 steps, "
        "validation accuracy every 40 steps, to see where it stops rising",
    ),
    "gpu": Protocol(
        name="gpu",
        image_size=224,
        max_steps=0,
        epochs=100,
        batch_size=16,
        max_train_samples=None,
        max_eval_samples=None,
        seeds=(0, 1, 2),
        bottleneck=64,
        ablation_bottlenecks=(32, 128),
        extra_args=("--drop_path_rate", "0.3"),
        model="microsoft/swin-large-patch4-window7-224-in22k",
        datasets=("hub:Donghyun99/Oxford-Flower-102", "hub:timm/oxford-iiit-pet"),
        note="the paper's classification setting, for a GPU: Swin-L (ImageNet-22k) from the Hub, Oxford Flowers-102 "
        "and Oxford-IIIT Pets from the Hub, the official recipe (224 px, batch 16, 100 epochs, drop path 0.3; "
        "AdamW, 20% warm-up then cosine, clipping 5); not run yet",
    ),
    "quick": Protocol(
        name="quick",
        image_size=32,
        max_steps=3,
        batch_size=4,
        max_train_samples=24,
        max_eval_samples=12,
        seeds=(0, 1),
        bottleneck=8,
        ablation_bottlenecks=(4, 8),
        lr_grids={key: grid[1:] for key, grid in LR_GRIDS.items()},
        note="smoke test only: a few steps, nothing to read into the numbers",
    ),
}

DATASETS = ("textile", "animal-mnist")
"""Offline datasets: the embedded textile images (conformal-clip-data) and Animal-MNIST (the animal-mnist wheel's
gzip pickles). ``folder:<dir>`` names an image folder (one sub-folder per class), ``hub:<id>`` a Hub (or saved local)
dataset with image and label columns."""


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
    with gzip.open(root / "animal_data_version_3.gz", "rb") as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)  # noqa: S301  (a pinned wheel's own data file)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as handle:
        labels = np.asarray(pickle.load(handle), dtype=np.int64)  # noqa: S301
    return images, labels


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of consecutive parts with the given fractions, stratified by label."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum([0, *fractions]) * len(members)).astype(int)
        for i in range(len(fractions)):
            parts[i] += members[bounds[i] : bounds[i + 1]].tolist()
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def load_data(name: str, protocol: Protocol, split_seed: int = 42) -> Any:
    """Train/validation/test splits of a dataset as a ``mona_peft.training.ImageClassificationData``, subsampled to
    the protocol's sizes. Textile and image folders go through ``prepare_data`` (test 15%, validation 10%, stratified,
    as in ``scripts/train.py``); Animal-MNIST is split the same way here."""
    from mona_peft.training import DataArguments, prepare_data

    limits = {"max_train_samples": protocol.max_train_samples, "max_eval_samples": protocol.max_eval_samples}
    if name == "textile":
        return prepare_data(DataArguments(split_seed=split_seed, **limits))
    if name.startswith("folder:"):
        return prepare_data(DataArguments(train_dir=name.split(":", 1)[1], split_seed=split_seed, **limits))
    if name.startswith("hub:"):
        return prepare_data(DataArguments(dataset_name=name.split(":", 1)[1], split_seed=split_seed, **limits))
    if name == "animal-mnist":
        return _animal_mnist_data(protocol, split_seed)
    raise ValueError(f"Unknown dataset {name!r}: choose from {DATASETS}, folder:<dir> or hub:<id>.")


def _animal_mnist_data(protocol: Protocol, split_seed: int) -> Any:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from mona_peft.training import ImageClassificationData

    images, labels = animal_mnist_arrays()
    test, validation, train = _stratified_split(labels, (0.15, 0.10, 0.75), split_seed)
    rng = np.random.default_rng(split_seed)
    names = [str(i) for i in range(int(labels.max()) + 1)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
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
    return ImageClassificationData(
        DatasetDict(splits), "image", "label", names, "Animal-MNIST (28 x 28 grey, PyPI animal-mnist 0.4)"
    )


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

    def setting(self, name: str, default: Any) -> Any:
        """The value this run's variant gives setting ``name`` (typed like ``default``), else ``default``."""
        key, _, value = self.variant.partition("=")
        return type(default)(value) if key == name else default


ABLATION: dict[str, tuple[str, tuple[Any, ...]]] = {
    "A1": ("bottleneck", (128, 192)),
    "A2": ("dropout", (0.0,)),
    "A3": ("prefix_tokens", ("unchanged",)),
    "A4": ("head_learning_rate", (3e-4, 3e-3)),
    "A5": ("init", ("official",)),
}
"""The pre-registered ablation (docs/accuracy-ablation-plan.md): each variant changes one setting of Mona's
baseline (bottleneck 64, dropout 0.1, tokenwise prefix tokens, head learning rate 1e-3, zero init) and keeps its
learning rate. A1 and A5 are runs the suite knows already (another bottleneck; ``mona_official``), so the protocol's
own runs of the same configuration are reused."""
ABLATION_DATASET = "animal-mnist"


def ablation_specs(dataset: str, learning_rate: float, seed: int, bottleneck: int) -> list[tuple[str, RunSpec]]:
    """(label, run) of the baseline ("base") and of every variant of :data:`ABLATION` (e.g. "A2 dropout=0.0")
    for one seed."""
    specs = [("base", RunSpec(dataset, "mona", learning_rate, seed, bottleneck))]
    for vid, (name, values) in ABLATION.items():
        for value in values:
            if name == "bottleneck":
                spec = RunSpec(dataset, "mona", learning_rate, seed, value)
            elif name == "init":
                spec = RunSpec(dataset, "mona_official", learning_rate, seed, bottleneck)
            else:
                spec = RunSpec(dataset, "mona", learning_rate, seed, bottleneck, f"{name}={value}")
            specs.append((f"{vid} {name}={value}", spec))
    return specs


def _training_argv(spec: RunSpec, protocol: Protocol, model: str | None, output_dir: str) -> list[str]:
    """``scripts/train.py`` arguments of a run: the recipe's defaults, no checkpoints, no evaluation during
    training, a loss log entry every step."""
    epochs = protocol.epochs
    budget = ("--num_train_epochs", str(epochs)) if epochs else ("--max_steps", str(protocol.max_steps))
    argv = [
        "--method", METHODS[spec.method]["method"],
        "--learning_rate", repr(spec.learning_rate),
        "--bottleneck_dim", str(spec.bottleneck),
        "--seed", str(spec.seed),
        *budget,
        "--per_device_train_batch_size", str(protocol.batch_size),
        "--image_size", str(protocol.image_size),
        "--output_dir", output_dir,
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    argv += list(protocol.extra_args)
    if protocol.eval_steps:
        argv += ["--eval_strategy", "steps", "--eval_steps", str(protocol.eval_steps)]
    if (head_lr := spec.setting("head_learning_rate", 0.0)) > 0:
        argv += ["--head_learning_rate", repr(head_lr)]
    if model is not None:
        argv += ["--model_name_or_path", model]
    return argv


def build_model(model_args: Any, labels: list[str], model_path: str, spec: RunSpec) -> torch.nn.Module:
    """The backbone with a fresh head and the method applied, as ``mona_peft.training`` builds it; for
    ``mona_official`` the same Mona with ``init_weights="official"``, and Mona's dropout or prefix tokens as the
    run's ablation variant says."""
    from peft import get_peft_model

    from mona_peft import MonaConfig
    from mona_peft.training.recipe import apply_method, head_module_names, load_classifier

    model = load_classifier(model_args, labels, model_path)
    init = METHODS[spec.method].get("init", True)
    if METHODS[spec.method]["method"] == "mona" and (init is not True or spec.variant):
        config = MonaConfig(
            bottleneck_dim=model_args.bottleneck_dim,
            init_weights=init,
            dropout=spec.setting("dropout", 0.1),
            prefix_tokens=spec.setting("prefix_tokens", "tokenwise"),
            modules_to_save=head_module_names(model),
        )
        return get_peft_model(model, config)
    return apply_method(
        model,
        model_args.method,
        bottleneck_dim=model_args.bottleneck_dim,
        lora_rank=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
    )


def train_one(spec: RunSpec, protocol: Protocol, data: Any, model: str | None, model_path: str) -> dict[str, Any]:
    """Train one run with the package's Trainer and return its record: validation and test accuracy and loss, the
    training loss of every step, trainable parameters and wall time."""
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from mona_peft.training import CLASSIFICATION, Experiment, Preprocessing, parse_args
    from mona_peft.training.recipe import count_parameters, load_image_processor
    from mona_peft.training.run import make_trainer

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mona-accuracy-") as output_dir:
        model_args, data_args, training_args = parse_args(_training_argv(spec, protocol, model, output_dir))
        processor = load_image_processor(model_path)
        preprocessing = Preprocessing.from_processor(processor, data_args.image_size, data_args.min_crop_scale)
        set_seed(training_args.seed)
        network = build_model(model_args, data.labels, model_path, spec)
        experiment = Experiment(
            CLASSIFICATION, model_args, data_args, training_args, data, model_path, processor, preprocessing, network
        )
        trainer = make_trainer(experiment)
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        trainer.train()
        train_seconds = time.perf_counter() - started
        validation = trainer.evaluate(experiment.validation_set)
        test = trainer.predict(experiment.test_set, metric_key_prefix="test").metrics
        history = trainer.state.log_history
        losses = {e["step"]: e["loss"] for e in history if "loss" in e and "step" in e}
        curve = {e["step"]: float(e["eval_accuracy"]) for e in history if "eval_accuracy" in e}
        trainable, total = count_parameters(network)
    return {
        **asdict(spec),
        "validation_accuracy": float(validation["eval_accuracy"]),
        "validation_loss": float(validation["eval_loss"]),
        "test_accuracy": float(test["test_accuracy"]),
        "test_loss": float(test["test_loss"]),
        "validation_samples": len(data.splits["validation"]),
        "test_samples": len(data.splits["test"]),
        "train_loss": [float(losses[s]) for s in sorted(losses)],
        **(
            {"validation_curve": sorted({**curve, trainer.state.global_step: validation["eval_accuracy"]}.items())}
            if protocol.eval_steps
            else {}
        ),
        "steps": int(trainer.state.global_step),
        "head_learning_rate": float(model_args.head_learning_rate),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


# ------------------------------------------------------------------------------------------------------- the suite


def choose_learning_rate(runs: Sequence[dict[str, Any]]) -> float:
    """The swept learning rate with the highest validation accuracy (ties: the smaller one, lower validation loss
    first)."""
    best = max(runs, key=lambda r: (r["validation_accuracy"], -r["validation_loss"], -r["learning_rate"]))
    return float(best["learning_rate"])


def next_rate(swept: Sequence[float], chosen: float) -> float | None:
    """The rate one grid step past ``chosen`` when it is the smallest or largest swept rate, else None.

    A best rate at the edge of the grid says the best may lie beyond it, so the sweep takes one more step that way
    (the same rule for every method, fixed before the results: ``Protocol.grid_extensions`` steps at most). The step
    is the grid's own geometric factor, rounded to two significant digits.
    """
    swept = sorted(swept)
    if len(swept) < 2 or chosen not in (swept[0], swept[-1]):
        return None
    if chosen == swept[-1]:
        return float(f"{chosen * swept[-1] / swept[-2]:.2g}")
    return float(f"{chosen * swept[0] / swept[1]:.2g}")


def _sweep_state(
    runs: Sequence[dict[str, Any]], protocol: Protocol, dataset: str, method: str
) -> tuple[list[dict[str, Any]], float | None]:
    """(the sweep runs of ``method`` on ``dataset`` that ``protocol`` asks for and that are done, the next rate it
    asks for that has not been run, or None): its grid, then up to ``grid_extensions`` steps of :func:`next_rate`."""
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
    """n, mean, sample standard deviation (ddof 1; 0 for one value), min and max."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Step-wise mean of training-loss curves (over the steps all of them have)."""
    length = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(length)]


def summarize(runs: Sequence[dict[str, Any]], protocol: Protocol, dataset: str, methods: Sequence[str]) -> dict:
    """Per method: the chosen learning rate (and whether it is at the edge of the grid), test and validation accuracy
    over the seeds, trainable parameters, time, mean loss curve; and the bottleneck ablation."""
    summary: dict[str, Any] = {"methods": {}, "ablation": {}}

    def done(method: str, lr: float, bottleneck: int) -> list[dict[str, Any]]:
        keys = {"dataset": dataset, "method": method, "learning_rate": lr, "bottleneck": bottleneck, "variant": ""}
        return [r for r in runs if all(r.get(k, "") == v for k, v in keys.items()) and r["seed"] in protocol.seeds]

    for method in methods:
        sweep = _sweep_state(runs, protocol, dataset, method)[0]
        if not sweep:
            continue
        grid = sorted(r["learning_rate"] for r in sweep)
        chosen = choose_learning_rate(sweep)
        final = done(method, chosen, protocol.bottleneck)
        summary["methods"][method] = {
            "label": METHODS[method]["label"],
            "learning_rate": chosen,
            "swept_learning_rates": grid,
            "lr_at_grid_edge": len(grid) > 1 and chosen in (grid[0], grid[-1]),
            "head_learning_rate": final[0]["head_learning_rate"] if final else None,
            "test_accuracy": spread([r["test_accuracy"] for r in final]),
            "validation_accuracy": spread([r["validation_accuracy"] for r in final]),
            "trainable_params": final[0]["trainable_params"] if final else None,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in final) if final else None,
            "seeds": sorted(r["seed"] for r in final),
            "loss_curve": mean_curve([r["train_loss"] for r in final]) if final else [],
        }
    if "mona" in summary["methods"]:
        lr = summary["methods"]["mona"]["learning_rate"]
        for m in protocol.ablation_bottlenecks:
            if ablation := done("mona", lr, m):
                summary["ablation"][str(m)] = {
                    "test_accuracy": spread([r["test_accuracy"] for r in ablation]),
                    "validation_accuracy": spread([r["validation_accuracy"] for r in ablation]),
                    "trainable_params": ablation[0]["trainable_params"],
                    "learning_rate": lr,
                }
        if any(r["dataset"] == dataset and r["phase"] == "plan" for r in runs):
            summary["variants"] = summarize_ablation(runs, protocol, dataset, lr)
    return summary


def summarize_ablation(runs: Sequence[dict[str, Any]], protocol: Protocol, dataset: str, lr: float) -> dict:
    """Per variant of the pre-registered ablation that has runs: its setting, test and validation accuracy over the
    seeds, trainable parameters and seconds per run (``base`` is the baseline)."""
    done = {RunSpec.of(r).key(): r for r in runs}
    table: dict[str, Any] = {}
    for label, spec in ablation_specs(dataset, lr, protocol.seeds[0], protocol.bottleneck):
        found = [done[k] for k in (replace(spec, seed=s).key() for s in protocol.seeds) if k in done]
        if found:
            table[label] = {
                "test_accuracy": spread([r["test_accuracy"] for r in found]),
                "validation_accuracy": spread([r["validation_accuracy"] for r in found]),
                "trainable_params": found[0]["trainable_params"],
                "seconds": statistics.fmean(r["seconds"] for r in found),
            }
    return table


class Suite:
    """Runs the protocol, keeps every run's record and rewrites the results JSON after each run."""

    def __init__(
        self,
        protocol: Protocol,
        datasets: Sequence[str],
        methods: Sequence[str],
        model: str | None,
        results_name: str,
        results_dir: Path | None,
        resume: bool,
    ) -> None:
        self.protocol = protocol
        self.datasets = list(datasets)
        self.methods = list(methods)
        self.model = model
        self.results_name = results_name
        self.results_dir = results_dir
        self.runs: list[dict[str, Any]] = []
        self.data_info: dict[str, Any] = {}
        self.started = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.payload: dict[str, Any] = {"machine": machine_info(device), "protocol": protocol.describe()}
        self.earlier_seconds = 0.0
        self.sessions = 1
        if resume:
            self.runs = self._previous_runs()

    def _previous_runs(self) -> list[dict[str, Any]]:
        path = Path(self.results_dir or RESULTS_DIR) / f"{self.results_name}.json"
        if not path.exists():
            return []
        previous = json.loads(path.read_text())
        before = {k: previous.get("protocol", {}).get(k) for k in self.protocol.run_settings()}
        if before != json.loads(json.dumps(self.protocol.run_settings())):
            print(f"{path} was written with another protocol: starting afresh.", flush=True)
            return []
        print(f"Resuming: {len(previous['runs'])} runs already in {path}.", flush=True)
        # the suite's time and session count carry over, so the page reports the whole suite's cost
        self.earlier_seconds = float(previous.get("suite_seconds", 0.0))
        self.sessions = int(previous.get("sessions", 1)) + 1
        self.data_info = dict(previous.get("datasets", {}))  # an ablation-only session keeps the other datasets
        return list(previous["runs"])

    def run(self, spec: RunSpec, phase: str, data: Any, model_path: str) -> dict[str, Any]:
        for record in self.runs:
            if RunSpec.of(record).key() == spec.key():
                return record
        record = {"phase": phase, **train_one(spec, self.protocol, data, self.model, model_path)}
        self.runs.append(record)
        elapsed = time.perf_counter() - self.started
        print(
            f"[{elapsed / 60:5.1f} min] {spec.dataset:12s} {phase:8s} {spec.method:14s} lr {spec.learning_rate:<8g} "
            f"seed {spec.seed} m {spec.bottleneck:<3d} {spec.variant}: val {record['validation_accuracy']:.3f} "
            f"test {record['test_accuracy']:.3f} last loss {record['train_loss'][-1]:.3f} ({record['seconds']:.0f} s)",
            flush=True,
        )
        self.write()
        return record

    def _chosen_rate(self, dataset: str, method: str) -> float:
        return choose_learning_rate(_sweep_state(self.runs, self.protocol, dataset, method)[0])

    def write(self, finished: bool = False) -> Path:
        payload = {
            **self.payload,
            "datasets": self.data_info,
            "methods": {k: METHODS[k]["label"] for k in self.methods},
            "finished": finished,
            "suite_seconds": round(self.earlier_seconds + time.perf_counter() - self.started, 1),
            "sessions": self.sessions,
            "summary": {d: summarize(self.runs, self.protocol, d, self.methods) for d in self.data_info},
            "runs": self.runs,
        }
        return write_results(self.results_name, payload, self.results_dir)

    def execute(self) -> Path:
        from mona_peft.training.recipe import resolve_model_path

        model_path = resolve_model_path(self.model)
        protocol = self.protocol
        for dataset in self.datasets:
            data = load_data(dataset, protocol)
            self.data_info[dataset] = {
                "description": data.description,
                "classes": len(data.labels),
                "sizes": {name: len(data.splits[name]) for name in data.splits},
            }
            print(data.summary(), flush=True)
            first, *others = protocol.seeds
            for method in self.methods:  # 1. the sweep, one seed, extended past an edge that wins
                for lr in protocol.lr_grids[method]:
                    self.run(RunSpec(dataset, method, lr, first, protocol.bottleneck), "sweep", data, model_path)
                while (lr := _sweep_state(self.runs, protocol, dataset, method)[1]) is not None:
                    self.run(RunSpec(dataset, method, lr, first, protocol.bottleneck), "sweep", data, model_path)
            for method in self.methods:  # 2. the other seeds at the chosen learning rate
                lr = self._chosen_rate(dataset, method)
                for seed in others:
                    self.run(RunSpec(dataset, method, lr, seed, protocol.bottleneck), "seed", data, model_path)
            if "mona" in self.methods:  # 3. the bottleneck ablation at Mona's chosen learning rate
                lr = self._chosen_rate(dataset, "mona")
                for m in protocol.ablation_bottlenecks:
                    if m == protocol.bottleneck:
                        continue
                    for seed in protocol.seeds:
                        self.run(RunSpec(dataset, "mona", lr, seed, m), "ablation", data, model_path)
        return self.write(finished=True)

    def execute_ablation(self, dataset: str = ABLATION_DATASET) -> Path:
        """The pre-registered ablation on ``dataset`` at Mona's chosen learning rate of this protocol, whose sweep
        must be in the results already; the protocol's runs of the same configuration are reused."""
        from mona_peft.training.recipe import resolve_model_path

        if not _sweep_state(self.runs, self.protocol, dataset, "mona")[0]:
            raise SystemExit(f"The ablation needs Mona's sweep on {dataset} in this protocol's results: run it first.")
        model_path = resolve_model_path(self.model)
        data = load_data(dataset, self.protocol)
        self.data_info[dataset] = {
            "description": data.description,
            "classes": len(data.labels),
            "sizes": {name: len(data.splits[name]) for name in data.splits},
        }
        lr = self._chosen_rate(dataset, "mona")
        for seed in self.protocol.seeds:
            for _, spec in ablation_specs(dataset, lr, seed, self.protocol.bottleneck):
                self.run(spec, "plan", data, model_path)
        return self.write(finished=True)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny setting for the smoke test")
    size.add_argument("--full", action="store_true", help="the full-size protocol (the default when CUDA is there)")
    size.add_argument("--cpu", action="store_true", help="the CPU protocol even when CUDA is there")
    size.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None, help="any protocol by name")
    parser.add_argument("--datasets", default=None, help="comma-separated; also folder:<dir>, hub:<id>")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the offline DINOv2-small)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--resume", action="store_true", help="keep the runs the results file already holds")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run (smoke tests of a long protocol)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of the protocol's")
    parser.add_argument(
        "--ablation",
        nargs="?",
        const=ABLATION_DATASET,
        metavar="DATASET",
        help=f"the pre-registered ablation (docs/accuracy-ablation-plan.md) on DATASET (default {ABLATION_DATASET})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default on a CPU: 1; two threads on this shared 2-core machine ran 10x slower)",
    )
    args = parser.parse_args(argv)

    if args.protocol:
        protocol = PROTOCOLS[args.protocol]
    elif args.quick:
        protocol = PROTOCOLS["quick"]
    elif args.full or (not args.cpu and torch.cuda.is_available()):
        protocol = PROTOCOLS["full"]
    else:
        protocol = PROTOCOLS["cpu"]
    if args.max_steps is not None:
        protocol = replace(protocol, max_steps=args.max_steps, epochs=None, name=f"{protocol.name}-capped")
    if args.seeds is not None:
        protocol = replace(protocol, seeds=tuple(int(s) for s in args.seeds.split(",")))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    datasets = [d.strip() for d in (args.datasets or ",".join(protocol.datasets)).split(",") if d.strip()]
    threads = torch.get_num_threads()
    if args.threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    name = {"cpu": "accuracy", "cpu112": "accuracy_112"}.get(protocol.name, f"accuracy_{protocol.name}")
    model = args.model or protocol.model
    suite = Suite(protocol, datasets, methods, model, name, args.results_dir, args.resume or args.ablation)
    try:
        path = suite.execute_ablation(args.ablation) if args.ablation else suite.execute()
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests): leave the thread count as found
    minutes = (time.perf_counter() - suite.started) / 60
    print(f"wrote {path} ({len(suite.runs)} runs, {minutes:.1f} min)", flush=True)
    return path


if __name__ == "__main__":
    main()
