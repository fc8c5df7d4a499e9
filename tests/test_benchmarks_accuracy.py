"""benchmarks.accuracy beyond the 56 px protocol: the pre-registered ablation, validation curves, the report of several
protocols, and a smoke test of the GPU protocol on a tiny model and a local dataset laid out like a Hub one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.training_helpers import make_image_folder, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accuracy-more")
    return {
        "root": root,
        "model": make_tiny_checkpoint(root / "model", "dinov2"),
        "folder": make_image_folder(root / "images", per_class=12),
    }


@pytest.fixture(scope="module")
def ablation(tiny: dict[str, Path]) -> dict:
    """The quick protocol on Mona only, then ``--ablation`` on the same data."""
    from benchmarks import accuracy

    out = tiny["root"] / "ablation"
    data = f"folder:{tiny['folder']}"
    common = ["--quick", "--model", str(tiny["model"]), "--results-dir", str(out), "--methods", "mona,mona_official"]
    with pytest.raises(SystemExit, match="run it first"):
        accuracy.main([*common, "--ablation", data])
    before = json.loads(accuracy.main([*common, "--datasets", data]).read_text())
    path = accuracy.main([*common, "--ablation", data])
    return {"before": before, "after": json.loads(path.read_text()), "path": path, "data": data}


def test_ablation_runs_every_preregistered_variant_once_per_seed(ablation: dict) -> None:
    from benchmarks.accuracy import ABLATION, PROTOCOLS

    protocol = PROTOCOLS["quick"]
    after = ablation["after"]
    plan = [r for r in after["runs"] if r["phase"] == "plan"]
    variants = {r.get("variant", "") for r in plan}
    assert variants >= {
        "dropout=0.0",
        "prefix_tokens=unchanged",
        "head_learning_rate=0.0003",
        "head_learning_rate=0.003",
    }
    table = after["summary"][ablation["data"]]["variants"]
    expected = ["base"] + [f"{vid} {name}={value}" for vid, (name, values) in ABLATION.items() for value in values]
    assert list(table) == expected
    assert all(v["test_accuracy"]["n"] == len(protocol.seeds) for v in table.values())
    # the baseline is the protocol's own Mona runs, reused and not run again
    assert table["base"]["test_accuracy"] == after["summary"][ablation["data"]]["methods"]["mona"]["test_accuracy"]
    assert len(after["runs"]) - len(ablation["before"]["runs"]) == len(plan)
    # a variant that changes the head's learning rate trains differently from the baseline with the same seed
    lr = after["summary"][ablation["data"]]["methods"]["mona"]["learning_rate"]
    base = next(r for r in after["runs"] if r["method"] == "mona" and r["learning_rate"] == lr and not r.get("variant")
                and r["seed"] == 0 and r["bottleneck"] == protocol.bottleneck)  # fmt: skip
    fast = next(r for r in plan if r.get("variant") == "head_learning_rate=0.003" and r["seed"] == 0)
    assert fast["head_learning_rate"] == 3e-3 and base["head_learning_rate"] == 1e-3
    assert fast["train_loss"] != base["train_loss"]
    # wider bottlenecks train more parameters; dropout and prefix tokens do not change the count
    assert table["A1 bottleneck=192"]["trainable_params"] > table["A1 bottleneck=128"]["trainable_params"]
    assert table["A2 dropout=0.0"]["trainable_params"] == table["base"]["trainable_params"]


def test_merge_joins_suites_run_side_by_side(ablation: dict, tmp_path: Path) -> None:
    """Two processes, one per method here (per dataset in practice), each with its own results file: --merge adds the
    other's runs and rewrites the summary from all of them, training nothing; other run settings are refused."""
    from benchmarks import accuracy

    full = ablation["before"]
    halves = []
    for method in ("mona", "mona_official"):
        part = {**full, "runs": [r for r in full["runs"] if r["method"] == method]}
        (tmp_path / method).mkdir()
        (tmp_path / method / "accuracy_quick.json").write_text(json.dumps(part))
        halves.append(tmp_path / method / "accuracy_quick.json")
    args = ["--quick", "--results-dir", str(tmp_path / "mona"), "--methods", "mona,mona_official", "--merge"]
    merged = json.loads(accuracy.main([*args, str(halves[1])]).read_text())
    key = lambda r: (r["method"], r["learning_rate"], r["seed"], r["bottleneck"])  # noqa: E731
    assert sorted(map(key, merged["runs"])) == sorted(map(key, full["runs"]))
    assert merged["summary"] == full["summary"]
    assert full["finished"] and merged["finished"]  # both parts had finished
    # the suite's time adds the added runs' seconds; merging the same file again adds no runs and no time
    added = sum(r["seconds"] for r in full["runs"] if r["method"] == "mona_official")
    assert merged["suite_seconds"] == pytest.approx(full["suite_seconds"] + added, abs=1.0)
    again = json.loads(accuracy.main([*args, str(halves[1])]).read_text())
    assert len(again["runs"]) == len(merged["runs"])
    assert again["suite_seconds"] == pytest.approx(merged["suite_seconds"], abs=1.0)
    (tmp_path / "unfinished.json").write_text(json.dumps({**json.loads(halves[1].read_text()), "finished": False}))
    assert not json.loads(accuracy.main([*args, str(tmp_path / "unfinished.json")]).read_text())["finished"]
    other = {**full, "protocol": {**full["protocol"], "image_size": 64}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other run settings"):
        accuracy.main([*args, str(tmp_path / "other.json")])


def test_report_renders_the_ablation_the_params_plot_and_resolutions(ablation: dict, tmp_path: Path) -> None:
    from benchmarks.report import accuracy_sections

    results = tmp_path / "results"
    results.mkdir()
    payload = ablation["after"]
    payload["protocol"]["name"] = "cpu"
    (results / "accuracy.json").write_text(json.dumps(payload))
    wide = json.loads(json.dumps(payload))
    wide["protocol"].update(name="cpu112", image_size=112)
    (results / "accuracy_112.json").write_text(json.dumps(wide))
    docs = tmp_path / "docs"
    docs.mkdir()
    text = "\n".join(accuracy_sections(results, docs))
    assert "## 3. Accuracy" in text and "## 3b. Accuracy at 112 px" in text
    assert "Pre-registered ablation" in text and "| A2 dropout=0.0 |" in text
    assert "no change" in text or "**changes**" in text
    assert "| dataset | method | test accuracy, 32 px | test accuracy, 112 px |" in text  # quick is 32 px
    assert (docs / "accuracy_params.png").stat().st_size > 1000
    assert (docs / "accuracy_params_cpu112.png").stat().st_size > 1000


def test_224_px_protocol_keeps_the_rates_the_112_px_protocol_chose() -> None:
    """gpu224 does not sweep: each method's one rate is the one the committed 112 px results chose on Animal-MNIST."""
    from benchmarks.accuracy import PROTOCOLS
    from benchmarks.common import RESULTS_DIR

    chosen = json.loads((RESULTS_DIR / "accuracy_112.json").read_text())["summary"]["animal-mnist"]["methods"]
    protocol = PROTOCOLS["gpu224"]
    assert protocol.image_size == 224 and protocol.grid_extensions == 0
    assert protocol.max_steps == PROTOCOLS["cpu112"].max_steps and protocol.seeds == PROTOCOLS["cpu112"].seeds
    assert dict(protocol.lr_grids) == {m: (s["learning_rate"],) for m, s in chosen.items()}


def test_report_of_a_fixed_rate_protocol_says_so_and_has_no_sweep_table(ablation: dict, tmp_path: Path) -> None:
    from benchmarks.report import accuracy_sections

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    payload = json.loads(json.dumps(ablation["after"]))
    payload["protocol"].update(name="cpu")
    (results / "accuracy.json").write_text(json.dumps(payload))
    fixed = json.loads(json.dumps(payload))
    fixed["protocol"].update(name="gpu224", image_size=224, grid_extensions=0)
    fixed["protocol"]["lr_grids"] = {m: grid[:1] for m, grid in fixed["protocol"]["lr_grids"].items()}
    fixed["machine"].update(device="cuda", gpu="Some GPU")
    # a full fine-tuning entry with validation curves: seed 0 flat over its last interval, seed 1 up 0.1
    (dataset,) = fixed["summary"]
    methods = fixed["summary"][dataset]["methods"]
    methods["full"], fixed["methods"]["full"] = {**methods["mona"], "label": "Full fine-tuning"}, "Full fine-tuning"
    for r in [r for r in fixed["runs"] if r["method"] == "mona" and not r.get("variant")]:
        fixed["runs"].append({**r, "method": "full", "validation_curve": [[2, 0.5], [3, 0.5 + 0.1 * r["seed"]]]})
    (results / "accuracy_gpu224.json").write_text(json.dumps(fixed))
    cpu_text, fixed_text, resolutions = accuracy_sections(results, docs)
    assert "Learning-rate sweep (one seed)" in cpu_text and "Learning rates swept" in cpu_text
    # how full fine-tuning's validation accuracy moved over its last evaluation interval, as a paragraph of its own
    interval = "Full fine-tuning over its last evaluation interval (steps 2–3): mean validation accuracy 0.500 → 0.550"
    assert f"\n\n{interval} (+5.0 points), rising in 1 of 2 seeds; " in fixed_text
    assert re.search(r"one binomial standard error of a single run's accuracy [^\n]+ points\.\n\n", fixed_text)
    assert "over its last evaluation interval" not in cpu_text  # no validation curves there
    assert "## 3c. Accuracy at 224 px" in fixed_text and "Learning rates fixed, not swept" in fixed_text
    assert "Learning-rate sweep (one seed)" not in fixed_text and "on Some GPU)" in fixed_text
    assert "test accuracy, 224 px (Some GPU) |" in resolutions
    assert "The 224 px column (protocol `gpu224`) trains each method at one fixed rate" in resolutions


def test_validation_curve_is_recorded_every_eval_steps(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from benchmarks import accuracy

    quick = replace(accuracy.PROTOCOLS["quick"], max_steps=5, eval_steps=2, seeds=(0,))
    monkeypatch.setitem(accuracy.PROTOCOLS, "quick", quick)
    path = accuracy.main(["--quick", "--model", str(tiny["model"]), "--datasets", f"folder:{tiny['folder']}",
                          "--methods", "linear", "--results-dir", str(tmp_path)])  # fmt: skip
    runs = json.loads(path.read_text())["runs"]
    # the Trainer's evaluations at steps 2 and 4, then the final one at step 5
    assert runs and all([step for step, _ in r["validation_curve"]] == [2, 4, 5] for r in runs)


def test_gpu_protocol_smoke(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The GPU protocol's code path (hub:<id> data, drop path, epochs replaced by --max-steps) on a tiny model and a
    local folder of parquet files, laid out like a Hub dataset with train and test splits only."""
    from benchmarks import accuracy
    from datasets import load_dataset

    hub = tmp_path / "hub-dataset"
    hub.mkdir()
    images = load_dataset("imagefolder", data_dir=str(tiny["folder"]))["train"].train_test_split(0.3, seed=0)
    for split, data in images.items():
        data.to_parquet(hub / f"{split}.parquet")
    argv = ["--protocol", "gpu", "--max-steps", "2", "--seeds", "0", "--methods", "full,mona", "--model",
            str(tiny["model"]), "--datasets", f"hub:{hub}", "--results-dir", str(tmp_path / "out")]  # fmt: skip
    payload = json.loads(accuracy.main(argv).read_text())
    assert payload["protocol"]["name"] == "gpu-capped" and payload["protocol"]["image_size"] == 224
    assert payload["protocol"]["extra_args"] == ["--drop_path_rate", "0.3"]
    summary = payload["summary"][f"hub:{hub}"]["methods"]
    assert set(summary) == {"full", "mona"} and all(r["steps"] == 2 for r in payload["runs"])
    sizes = payload["datasets"][f"hub:{hub}"]["sizes"]
    assert sizes["validation"] > 0 and sizes["test"] == len(images["test"])
