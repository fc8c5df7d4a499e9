"""Smoke tests of the benchmark scripts (not timed tests): they run with ``--quick``, write the JSON they promise,
params reproduces the official Swin-L count, speed runs every method (including a baseline git revision in its own
interpreter and a mixed-adapter batch), the profile's instrumented copy of Mona computes what Mona computes, the
benchmarks use only mona_peft's public API, and the report renders."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path
    sys.path.insert(0, str(REPO))

STATS = {"n", "median", "q1", "q3", "min", "max"}
# The last commit before the Mona layer v2 rewrite: the speed benchmark's baseline. A checkout without it (a shallow
# clone) uses HEAD, which exercises the same machinery.
BEFORE_REWRITE = "d706065"


def _baseline_rev() -> str | None:
    def exists(rev: str) -> bool:
        done = subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True)
        return done.returncode == 0

    try:
        return next((rev for rev in (BEFORE_REWRITE, "HEAD") if exists(rev)), None)
    except OSError:  # no git
        return None


@pytest.fixture(scope="module")
def quick_params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.py --quick, in-process."""
    from benchmarks import params

    results = tmp_path_factory.mktemp("params")
    params.main(["--quick", "--results-dir", str(results)])
    return results


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """speed.py --quick in a subprocess (it forks workers), with a baseline revision when this is a git checkout (fork
    for the other workers, to keep the smoke test short)."""
    results = tmp_path_factory.mktemp("results")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.speed", "--quick", "--results-dir", str(results)]
    rev = _baseline_rev()
    if rev is not None:
        command += ["--baseline-rev", rev, "--start-method", "fork"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return results


def _machine_ok(machine: dict) -> None:
    for key in ("cpu", "logical_cores", "torch", "transformers", "peft", "date", "command"):
        assert machine.get(key), key


def test_params_reproduces_the_official_counts(quick_params: Path) -> None:
    data = json.loads((quick_params / "params_quick.json").read_text())
    _machine_ok(data["machine"])
    models = {m["key"]: m for m in data["models"]}
    swin_l = models["swin-l"]
    (mona,) = swin_l["mona"]
    assert mona["bottleneck"] == 64
    assert mona["params"] == mona["formula"] == 5_267_712
    assert swin_l["matches_official"] and models["swin-t"]["matches_official"]
    assert models["swin-t"]["mona"][0]["params"] == 1_408_128
    assert 0 < mona["share_of_backbone"] < models["swin-t"]["mona"][0]["share_of_backbone"] < 1
    # fp32 safetensors: 4 bytes a parameter plus a small JSON header
    assert 4 * mona["params"] < mona["adapter_file_bytes"] < 4 * mona["params"] + 200_000
    lora = swin_l["lora"]
    assert lora["rank"] == 16 and set(lora["targets"]) in ({"q_proj", "v_proj"}, {"query", "value"})
    assert lora["params"] == 16 * 2 * 2 * sum(m * c for m, c in ((2, 192), (2, 384), (18, 768), (2, 1536)))
    upernet = data["upernet_swin_l"]
    assert upernet["mona_params"] == 5_267_712 and upernet["matches_official"]
    assert upernet["backbone_params"] > 190_000_000 and set(upernet["head_params"]) >= {"decode_head"}


def test_speed_json_has_the_expected_structure(quick_results: Path) -> None:
    data = json.loads((quick_results / "speed_quick.json").read_text())
    _machine_ok(data["machine"])
    settings = data["settings"]
    methods = set(settings["methods"])
    baseline = settings["baseline"]
    expected = {"frozen", "full", "lora", "mona", "mona_ref", "mona_twin", "mona_unfused", "mona_single", "mona_mixed"}
    assert methods == expected | ({"mona_before"} if baseline else set())
    assert settings["memory_method"]
    assert len(data["configs"]) == len(settings["models"]) * len(settings["batches"])
    inference_only = {"frozen", "mona_single", "mona_mixed"}
    for config in data["configs"]:
        assert set(config["train"]) == methods - inference_only
        assert set(config["inference"]) == methods - {"full"}
        for kind in ("train", "inference"):
            for stats in config[kind].values():
                for key in ("seconds", "cpu_seconds", "peak_mib", "step_mib"):
                    assert set(stats[key]) == STATS and stats[key]["n"] == config["rounds"]
                assert stats["seconds"]["median"] > 0 and stats["peak_mib"]["median"] > 0
        for name in ("mona/lora", "mona/full", "mona/mona_ref", "mona_twin/mona", "mona/mona_unfused"):
            ratio = config["train_time_ratios"][name]
            assert len(ratio["values"]) == config["rounds"] and ratio["median"] > 0
        for name in ("mona/frozen", "mona_twin/mona", "mona_mixed/mona_single", "mona_single/mona"):
            ratio = config["inference_time_ratios"][name]
            assert len(ratio["values"]) == config["rounds"] and ratio["median"] > 0
        assert config["train_peak_ratios"]["mona/lora"]["median"] > 0
    records = data["records"]
    assert len(records) == sum(c["rounds"] * (len(c["train"]) + len(c["inference"])) for c in data["configs"])
    for mode in ("forward", "forward_backward"):
        assert data["filter"][mode]["ratios"]["reference/merged"]["median"] > 0
    targets = {t["target"] for t in data["targets"]}
    assert {"Mona train step <= 1.05 x LoRA", "Mona peak train memory <= 1.10 x LoRA"} <= targets
    assert all(t["status"] in ("met", "missed") for t in data["targets"])


def test_speed_methods_run_the_code_they_claim(quick_results: Path) -> None:
    """Each method's worker reports how its adapters compute and where its mona_peft came from."""
    data = json.loads((quick_results / "speed_quick.json").read_text())
    current = data["settings"]["current_code"]
    import mona_peft

    assert current["mona_peft_file"] == mona_peft.__file__ and len(current["mona_peft_sha256"]) == 64
    for config in data["configs"]:
        workers = config["workers"]
        for method in ("frozen", "full", "lora", "mona", "mona_ref", "mona_unfused", "mona_single", "mona_mixed"):
            assert workers[method]["mona_peft_file"] == current["mona_peft_file"], method
        for method in ("frozen", "full", "lora"):
            assert workers[method]["mona_adapters"] == 0
        adapters = workers["mona"]["mona_adapters"]
        assert adapters > 0 and adapters % 2 == 0  # two positions per block
        # set_compute reached every adapter of the model, and only the flag it was asked to change
        assert (
            workers["mona"]["mona_compute"]
            == workers["mona_twin"]["mona_compute"]
            == ["fused=True, merge_filters=True"]
        )
        assert workers["mona_unfused"]["mona_compute"] == ["fused=False, merge_filters=True"]
        assert workers["mona_ref"]["mona_compute"] == ["fused=True, merge_filters=False"]
        # the mixed-batch model holds a second adapter: twice the modules, same compute
        for method in ("mona_single", "mona_mixed"):
            assert workers[method]["mona_adapters"] == 2 * adapters
            assert workers[method]["mona_compute"] == ["fused=True, merge_filters=True"]
        # ... and its second adapter (and head) are trainable parameters of their own
        assert workers["mona_mixed"]["total_params"] > workers["mona"]["total_params"]


def test_speed_baseline_revision_runs_in_its_own_interpreter(quick_results: Path) -> None:
    data = json.loads((quick_results / "speed_quick.json").read_text())
    baseline = data["settings"]["baseline"]
    if baseline is None:
        pytest.skip("not a git checkout: no baseline revision to measure")
    done = subprocess.run(["git", "rev-parse", f"{baseline['rev']}^{{commit}}"], cwd=REPO, capture_output=True)
    assert baseline["commit"] == done.stdout.decode().strip() and baseline["short"] == baseline["commit"][:7]
    assert data["settings"]["method_labels"]["mona_before"] == f"Mona before ({baseline['short']})"
    src = str(REPO / "src")
    for config in data["configs"]:
        worker = config["workers"]["mona_before"]
        # the baseline's package, from the extracted revision, not this checkout's src/
        assert "mona_baseline_" in worker["mona_peft_file"] and not worker["mona_peft_file"].startswith(src)
        assert worker["trainable_params"] == config["workers"]["mona"]["trainable_params"]
        for kind in ("train", "inference"):
            ratio = config[f"{kind}_time_ratios"]["mona/mona_before"]
            assert len(ratio["values"]) == config["rounds"] and ratio["median"] > 0
        assert config["train_peak_ratios"]["mona/mona_before"]["median"] > 0
        if baseline["rev"] == BEFORE_REWRITE:
            assert worker["mona_adapters"] == 0  # no MonaAdapter before the rewrite
    if baseline["rev"] == BEFORE_REWRITE:
        assert baseline["mona_peft_sha256"] != data["settings"]["current_code"]["mona_peft_sha256"]
    targets = {t["target"] for t in data["targets"]}
    label = f"Mona before ({baseline['short']})"
    assert f"{label} train step <= 1.05 x LoRA" in targets
    assert f"no regression: Mona / {label}, train step <= 1.00" in targets


def test_speed_refuses_mona_before_without_a_revision() -> None:
    from benchmarks import speed

    with pytest.raises(SystemExit):
        speed.main(["--quick", "--methods", "mona,mona_before"])


def test_report_renders_tables_and_plots(quick_params: Path, quick_results: Path, tmp_path: Path) -> None:
    from benchmarks import report

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_params / "params_quick.json", results / "params.json")
    shutil.copy(quick_results / "speed_quick.json", results / "speed.json")
    docs = tmp_path / "docs"
    path = report.render_benchmarks(results, docs)
    text = path.read_text()
    assert "5,267,712" in text and "Mona, second copy (A/A)" in text and "Command: `python -m benchmarks.speed" in text
    assert "### Mixed-adapter batches" in text and "| mixed / one adapter |" in text
    assert "### What the fused norm + down projection buys" in text and "set_compute(model, fused=False)" in text
    speed = json.loads((results / "speed.json").read_text())
    if speed["settings"]["baseline"]:
        assert f"### Before and after: Mona now against Mona at {speed['settings']['baseline']['short']}" in text
    assert (docs / "params_share.png").stat().st_size > 1000 and not (docs / "speed.png").exists()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("merge_filters", [True, False])
@pytest.mark.parametrize(("prefix_tokens", "num_prefix"), [("tokenwise", 1), ("unchanged", 2), ("tokenwise", 0)])
def test_profile_stages_cover_the_adapters_own_forward(
    fused: bool, merge_filters: bool, prefix_tokens: str, num_prefix: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profile runs MonaAdapter.forward itself, unchanged, with every aten op of it in the range of its stage, the
    stages in forward order; a stage missing from the table leaves its ops unstaged, which the profile refuses."""
    import torch
    from benchmarks import profile_mona as P
    from torch.profiler import ProfilerActivity, profile

    from mona_peft import MonaAdapter

    torch.manual_seed(0)
    adapter = MonaAdapter(16, bottleneck_dim=8, prefix_tokens=prefix_tokens, init_weights="official").eval()
    adapter.fused, adapter.merge_filters = fused, merge_filters
    x = torch.randn(2, num_prefix + 12, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        assert torch.equal(P.staged(adapter, (3, 4), num_prefix)(x), adapter(x, (3, 4), num_prefix))
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    expected = [P.STAGE_NORM_DOWN] if fused else [P.STAGE_NORM, P.STAGE_DOWN]
    expected += [P.STAGE_GRID, *([P.STAGE_MERGE, P.STAGE_CONV] if merge_filters else [P.STAGE_CONVS]), P.STAGE_CAT]
    expected += [P.STAGE_PROJ, P.STAGE_GELU, P.STAGE_UP, *([P.STAGE_PREFIX] if prefix_tokens == "unchanged" else [])]
    assert list(dict.fromkeys(e.name for e in events if e.name in P.LABELS)) == expected
    assert P.unstaged_ops(events, P.FORWARD) == []
    monkeypatch.setattr(P, "STAGES", tuple(s for s in P.STAGES if s[1] != P.STAGE_GELU))
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        P.staged(adapter, (3, 4), num_prefix)(x)
    assert "aten::gelu" in P.unstaged_ops(list(prof.events()), P.FORWARD)


def test_profile_page_reads_only_stages_the_results_hold() -> None:
    """The profile page looks stages up by profile_mona's names; a renamed stage would read as missing (zero)."""
    import re

    from benchmarks import profile_mona

    template = (REPO / "benchmarks" / "templates" / "profile.md").read_text()
    used = set(re.findall(r"S\.((?:STAGE|GLUE)_[A-Z_]+)", template))
    assert {"STAGE_NORM", "STAGE_CONV", "GLUE_FORWARD"} <= used
    profile = json.loads((REPO / "benchmarks" / "results" / "profile.json").read_text())
    held = set(profile["train_step"]["median_ms"])
    for part in ("module", "module_fused"):
        for mode in ("train", "inference"):
            held |= set(profile[part][mode]["stages"])
    assert all(getattr(profile_mona, name) in held for name in used), sorted(used)


def _public_api_violations(path: Path) -> list[str]:
    """Uses of mona_peft's private names, and monkeypatching of what was imported from mona_peft, in one file."""
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mona_peft"):
            for alias in node.names:
                if alias.name.startswith("_") or (node.module or "").split(".")[-1].startswith("_"):
                    found.append(f"line {node.lineno}: imports {node.module}.{alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mona_peft"):
                    imported.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root = node.value
            while isinstance(root, ast.Attribute):  # mona_peft.layer.X -> mona_peft
                root = root.value
            if not (isinstance(root, ast.Name) and root.id in imported):
                continue
            private = node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__"))
            if private:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            if isinstance(node.ctx, ast.Store | ast.Del):
                found.append(f"line {node.lineno}: assigns {ast.unparse(node)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in imported
        ):
            found.append(f"line {node.lineno}: {node.func.id}({node.args[0].id}, ...)")
    return found


def test_benchmarks_use_only_public_api() -> None:
    """Acceptance of "Mona layer v2": no benchmark reaches into mona_peft's private names or patches its classes."""
    files = sorted((REPO / "benchmarks").glob("*.py"))
    assert files and not (REPO / "benchmarks" / "unfused.py").exists()
    violations = {f.name: found for f in files if (found := _public_api_violations(f))}
    assert violations == {}


def test_public_api_check_catches_patching(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mona_peft.layer import MonaLayer\nimport mona_peft\n"
        "MonaLayer.forward = None\nsetattr(MonaLayer, 'x', 1)\nmona_peft.layer._private\n"
    )
    assert len(_public_api_violations(bad)) == 3


@pytest.mark.slow  # ~30 s on an idle 2-core machine, over a minute on a loaded one
def test_profile_runs_and_renders(tmp_path: Path) -> None:
    from benchmarks import profile_mona, report

    results = tmp_path / "results"
    profile_mona.main(["--quick", "--threads", "1", "--name", "profile", "--results-dir", str(results)])
    data = json.loads((results / "profile.json").read_text())
    _machine_ok(data["machine"])
    for comparison in data["fused_module"].values():
        saved = comparison["saved_for_backward_mib"]
        assert 0 < saved["fused"] < saved["unfused"]  # the point of the fusion: fewer activations kept
        for mode in ("train", "inference"):
            assert set(comparison[mode]["ms"]) == {"unfused", "unfused_twin", "fused"}
            assert comparison[mode]["ratios"]["fused/unfused"]["median"] > 0
    assert data["module"]["fused"] is False and data["module_fused"]["fused"] is True
    assert profile_mona.STAGE_NORM in data["module"]["train"]["stages"]
    assert profile_mona.STAGE_NORM_DOWN in data["module_fused"]["train"]["stages"]
    step = data["train_step"]["median_ms"]
    assert step["mona compute: forward"] > 0 and step["mona compute: backward"] > 0
    # the residual adds of every block are found as glue, outside the adapters
    assert step[profile_mona.GLUE_FORWARD] > 0 and step[profile_mona.GLUE_BACKWARD] >= 0
    assert step[profile_mona.GLUE_PYTHON] > 0  # the layer's forward and hooks run Python of their own
    path = report.render_profile(results, tmp_path / "docs")
    text = path.read_text()
    assert "fused / unfused" in text and "set_compute(model, fused=False)" in text
    assert "Fused form (`fused=True`, the default), train" in text
    assert (tmp_path / "docs" / "profile_module.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------------ accuracy


@pytest.fixture(scope="module")
def quick_accuracy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """accuracy.py --quick in-process, on a tiny random DINOv2 checkpoint and a tiny three-colour image folder."""
    from benchmarks import accuracy
    from tests.training_helpers import make_image_folder, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("accuracy")
    model = make_tiny_checkpoint(root / "model", "dinov2")
    folder = make_image_folder(root / "images", per_class=12)
    argv = ["--quick", "--model", str(model), "--datasets", f"folder:{folder}", "--results-dir", str(root / "out")]
    path = accuracy.main(argv)
    first = json.loads(path.read_text())
    accuracy.main([*argv, "--resume"])  # nothing left to run: the same runs come back
    return {"data": first, "resumed": json.loads(path.read_text()), "path": path}


def test_accuracy_json_has_the_protocol_and_plausible_runs(quick_accuracy: dict) -> None:
    import math

    from benchmarks.accuracy import METHODS, PROTOCOLS

    from mona_peft.training.arguments import DEFAULT_HEAD_LEARNING_RATE

    data = quick_accuracy["data"]
    _machine_ok(data["machine"])
    protocol = PROTOCOLS["quick"]
    assert data["finished"] and data["protocol"]["name"] == "quick" and set(data["methods"]) == set(METHODS)
    (dataset,) = data["datasets"]
    assert data["datasets"][dataset]["classes"] == 3
    runs = data["runs"]
    summary = data["summary"][dataset]["methods"]
    sweeps = sum(len(s["swept_learning_rates"]) for s in summary.values())
    assert (
        sum(len(g) for g in protocol.lr_grids.values())
        <= sweeps
        <= sum(len(g) + protocol.grid_extensions for g in protocol.lr_grids.values())
    )
    assert sum(r["phase"] == "sweep" for r in runs) == sweeps
    extra_seeds = len(METHODS) * (len(protocol.seeds) - 1)
    ablation = (len(protocol.ablation_bottlenecks) - 1) * len(protocol.seeds)
    assert len(runs) == sweeps + extra_seeds + ablation
    keys = {(r["method"], r["learning_rate"], r["seed"], r["bottleneck"]) for r in runs}
    assert len(keys) == len(runs)  # no run twice
    for r in runs:
        assert 0 <= r["validation_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        assert r["steps"] == protocol.max_steps == len(r["train_loss"])
        assert all(math.isfinite(x) and x > 0 for x in r["train_loss"])
        assert math.isfinite(r["validation_loss"]) and math.isfinite(r["test_loss"])
        # the linear probe trains its head at the swept rate, every other method at the recipe's head rate
        head_rate = r["learning_rate"] if r["method"] == "linear" else DEFAULT_HEAD_LEARNING_RATE
        assert r["head_learning_rate"] == head_rate
    params = {m: s["trainable_params"] for m, s in data["summary"][dataset]["methods"].items()}
    assert params["linear"] < params["lora"] < params["full"] and params["linear"] < params["mona"]
    assert params["mona"] == params["mona_official"]
    assert quick_accuracy["resumed"]["runs"] == runs


def test_accuracy_grid_extension_rule() -> None:
    from benchmarks.accuracy import next_rate

    assert next_rate([3e-5, 1e-4, 3e-4], 3e-4) == 9e-4
    assert next_rate([3e-5, 1e-4, 3e-4], 3e-5) == 9e-6
    assert next_rate([1e-4, 3e-4, 1e-3], 1e-3) == 3.3e-3  # the outermost step's factor, two digits
    assert next_rate([1e-4, 3e-4, 1e-3], 1e-4) == 3.3e-5
    assert next_rate([1.5e-3, 5e-3, 1.5e-2], 1.5e-2) == 4.5e-2
    assert next_rate([1e-4, 3e-4, 1e-3], 3e-4) is None  # inside the grid: nothing to extend
    assert next_rate([1e-4], 1e-4) is None  # one rate: no factor to step by


def test_accuracy_sweep_picks_the_best_validation_rate(quick_accuracy: dict) -> None:
    from benchmarks.accuracy import PROTOCOLS, choose_learning_rate, next_rate

    data = quick_accuracy["data"]
    protocol = PROTOCOLS["quick"]
    (dataset,) = data["datasets"]
    summary = data["summary"][dataset]
    for method, s in summary["methods"].items():
        sweep = [r for r in data["runs"] if r["method"] == method and r["phase"] == "sweep"]
        rates = sorted(r["learning_rate"] for r in sweep)
        assert rates == s["swept_learning_rates"]
        # the grid, plus one step past its edge exactly when the grid's best rate sits on that edge
        grid = sorted(protocol.lr_grids[method])
        on_grid = [r for r in sweep if r["learning_rate"] in grid]
        extra = next_rate(grid, choose_learning_rate(on_grid))
        assert rates == sorted(grid + ([extra] if extra is not None else []))
        best = max(r["validation_accuracy"] for r in sweep)
        (chosen,) = [r for r in sweep if r["learning_rate"] == s["learning_rate"]]
        assert chosen["validation_accuracy"] == best
        final = [r for r in data["runs"] if r["method"] == method and r["learning_rate"] == s["learning_rate"]]
        final = [r for r in final if r["bottleneck"] == protocol.bottleneck]
        assert sorted(r["seed"] for r in final) == list(protocol.seeds) == s["seeds"]
        stats = s["test_accuracy"]
        assert stats["n"] == len(protocol.seeds) and sorted(stats["values"]) == sorted(
            r["test_accuracy"] for r in final
        )
        assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
        assert len(s["loss_curve"]) == protocol.max_steps
    ablation = summary["ablation"]
    assert [int(m) for m in ablation] == sorted(protocol.ablation_bottlenecks)
    sizes = [ablation[str(m)]["trainable_params"] for m in sorted(protocol.ablation_bottlenecks)]
    assert sizes == sorted(set(sizes))  # a wider bottleneck trains more parameters
    assert ablation[str(protocol.bottleneck)]["test_accuracy"] == summary["methods"]["mona"]["test_accuracy"]


def test_accuracy_report_renders_section_and_loss_plot(quick_accuracy: dict, tmp_path: Path) -> None:
    from benchmarks import report

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_accuracy["path"], results / "accuracy.json")
    docs = tmp_path / "docs"
    text = report.render_benchmarks(results, docs).read_text()
    assert "## 3. Accuracy" in text and "python -m benchmarks.accuracy" in text and "not here yet" not in text
    for label in ("Linear probe", "Full fine-tuning", "LoRA r16 (q, v)", "Mona (official init)"):
        assert f"| {label} |" in text
    assert "bottleneck ablation" in text and "Learning-rate sweep" in text
    (png,) = docs.glob("accuracy_loss_*.png")
    assert png.stat().st_size > 1000 and f"]({png.name})" in text
