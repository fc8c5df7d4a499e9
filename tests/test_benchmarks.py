"""Smoke tests of the benchmark scripts (not timed tests): they run with ``--quick``, write the JSON they promise,
params reproduces the official Swin-L count, the report renders, and the prototype patch computes what Mona does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path
    sys.path.insert(0, str(REPO))

STATS = {"n", "median", "q1", "q3", "min", "max"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.py in-process and speed.py in a subprocess (it forks workers), both with --quick."""
    from benchmarks import params

    results = tmp_path_factory.mktemp("results")
    params.main(["--quick", "--results-dir", str(results)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.speed", "--quick", "--results-dir", str(results)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return results


def _machine_ok(machine: dict) -> None:
    for key in ("cpu", "logical_cores", "torch", "transformers", "peft", "date", "command"):
        assert machine.get(key), key


def test_params_reproduces_the_official_counts(quick_results: Path) -> None:
    data = json.loads((quick_results / "params_quick.json").read_text())
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
    assert methods == {"frozen", "full", "lora", "mona", "mona_ref", "mona_twin"}
    assert settings["memory_method"]
    assert len(data["configs"]) == len(settings["models"]) * len(settings["batches"])
    for config in data["configs"]:
        assert set(config["train"]) == methods - {"frozen"}
        assert set(config["inference"]) == methods - {"full"}
        for kind in ("train", "inference"):
            for stats in config[kind].values():
                for key in ("seconds", "cpu_seconds", "peak_mib", "step_mib"):
                    assert set(stats[key]) == STATS and stats[key]["n"] == config["rounds"]
                assert stats["seconds"]["median"] > 0 and stats["peak_mib"]["median"] > 0
        for name in ("mona/lora", "mona/full", "mona/mona_ref", "mona_twin/mona"):
            ratio = config["train_time_ratios"][name]
            assert len(ratio["values"]) == config["rounds"] and ratio["median"] > 0
        for name in ("mona/frozen", "mona_twin/mona"):
            assert config["inference_time_ratios"][name]["median"] > 0
        assert config["train_peak_ratios"]["mona/lora"]["median"] > 0
    records = data["records"]
    assert len(records) == sum(c["rounds"] * (len(c["train"]) + len(c["inference"])) for c in data["configs"])
    for mode in ("forward", "forward_backward"):
        assert data["filter"][mode]["ratios"]["reference/merged"]["median"] > 0
    targets = {t["target"] for t in data["targets"]}
    assert {"Mona train step <= 1.05 x LoRA", "Mona peak train memory <= 1.10 x LoRA"} <= targets
    assert all(t["status"] in ("met", "missed") for t in data["targets"])


def test_report_renders_tables_and_plots(quick_results: Path, tmp_path: Path) -> None:
    from benchmarks import report

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_results / "params_quick.json", results / "params.json")
    shutil.copy(quick_results / "speed_quick.json", results / "speed.json")
    docs = tmp_path / "docs"
    path = report.render_benchmarks(results, docs)
    text = path.read_text()
    assert "5,267,712" in text and "Mona, second copy (A/A)" in text and "Command: `python -m benchmarks.speed" in text
    for png in ("params_share.png", "speed.png", "speed_targets.png"):
        assert (docs / png).stat().st_size > 1000


def _tiny_mona_layer(**config: object) -> torch.nn.Module:
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    import mona_peft
    from mona_peft.families import layout_for
    from mona_peft.layer import MonaLayer

    torch.manual_seed(0)
    block = ViTLayer(ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64))
    layer = MonaLayer(
        block, "default", mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False, **config), layout_for(block)
    )
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "mona_" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "scale" in name else 0.0))
    return layer.double()


@pytest.mark.parametrize("merge_filters", [True, False])
@pytest.mark.parametrize("prefix_tokens", ["tokenwise", "unchanged"])
def test_patched_delta_matches_mona(merge_filters: bool, prefix_tokens: str) -> None:
    from benchmarks.mona_patch import original_mona_delta, patched_mona_delta

    layer = _tiny_mona_layer(merge_filters=merge_filters, prefix_tokens=prefix_tokens).train()
    x = torch.randn(3, 1 + 5 * 4, 32, dtype=torch.float64)
    grad = torch.randn_like(x)
    results = []
    for delta in (original_mona_delta, patched_mona_delta):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same dropout mask
        out = delta(layer, "default", "attention", xi, (5, 4))
        out.backward(grad)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad(set_to_none=True)
        results.append((out.detach(), xi.grad, grads))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(gx_b, gx_a)
    assert gp_a.keys() == gp_b.keys() and len(gp_a) == 16
    for name in gp_a:
        torch.testing.assert_close(gp_b[name], gp_a[name], msg=name)


def test_scaled_norm_down_gradcheck() -> None:
    from benchmarks.mona_patch import ScaledNormDown

    torch.manual_seed(0)
    shapes = [(2, 5, 6), (6,), (6,), (6,), (6,), (3, 6), (3,)]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *a: ScaledNormDown.apply(*a, 1e-5), inputs)
    frozen_x = inputs[0].detach()
    assert torch.autograd.gradcheck(lambda *a: ScaledNormDown.apply(frozen_x, *a, 1e-5), inputs[1:])
