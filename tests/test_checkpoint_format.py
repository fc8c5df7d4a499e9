"""Checkpoint format v1 and the adapters saved before it.

Committed fixtures (tests/fixtures/, made by tests/fixtures/make_adapter_fixture.py): a tiny ViT and Swin, two
adapters each (one MLP-only with a single 3x3 kernel), saved by mona_peft 0.1.0 and by format v1, each under
transformers 5.x and 4.57. Every one of them must reload on the running line to the logits it gave when saved:
bit-identical on the line that saved it, to float rounding (1e-5) on the other line, whose attention kernels differ.
With ``MONA_OTHER_LINE_PYTHON`` set (``.ci/run`` sets it), an adapter is also carried live to the other line's
environment and back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from mona_peft import MonaCheckpointError, MonaConfig, MonaLayer
from tiny_models import FAMILIES, pixels

FIXTURES = Path(__file__).parent / "fixtures"
LINE = "tf5" if int(transformers.__version__.split(".")[0]) >= 5 else "tf457"
BASES = {"vit": transformers.ViTForImageClassification, "swin": transformers.SwinForImageClassification}


def _load_fixture(directory: Path, name: str) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    base = BASES[name].from_pretrained(directory / "base").eval()
    model = PeftModel.from_pretrained(base, directory / "adapters")
    model.load_adapter(directory / "adapters" / "single", adapter_name="single")
    return model.eval(), load_file(str(directory / "expected.safetensors"))


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("saved_on", ["tf5", "tf457"])
@pytest.mark.parametrize("version", ["v0.1.0", "v1"])
def test_saved_adapters_reload_to_their_logits(version: str, saved_on: str, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 0.1.0's retired merge_filters field loads without a warning
        model, expected = _load_fixture(FIXTURES / version / saved_on / name, name)
    for adapter in ("default", "single"):
        model.set_adapter(adapter)
        with torch.no_grad():
            logits = model(pixel_values=expected["pixel_values"]).logits
        if saved_on == LINE:
            assert torch.equal(logits, expected[f"logits_{adapter}"]), adapter
        else:
            torch.testing.assert_close(logits, expected[f"logits_{adapter}"], atol=1e-5, rtol=0)
    single = model.base_model.model
    layer = next(m for m in single.modules() if isinstance(m, MonaLayer))
    assert set(layer.adapters_of("single")) == {"mlp"}
    assert layer.adapters_of("single")["mlp"].kernel_sizes == (3,)


def test_v1_keys_are_readable_and_the_same_on_every_line(tmp_path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES["vit"].build(), MonaConfig(bottleneck_dim=8, positions=("attention",)))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    block = "base_model.model.vit.encoder.layer.0.mona_attn."  # the Hub's name of the block, on 5.x too
    assert [k.removeprefix(block) for k in keys if k.startswith(block)] == [
        "conv3.bias", "conv3.weight", "conv5.bias", "conv5.weight", "conv7.bias", "conv7.weight",
        "down.bias", "down.weight", "norm.bias", "norm.weight", "proj.bias", "proj.weight",
        "scale_norm", "scale_skip", "up.bias", "up.weight",
    ]  # fmt: skip
    assert not any(".layers." in k or ".default." in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r"vit\.encoder\.layer\.\d+"
    assert "merge_filters" not in config


def test_the_v1_fixture_equals_what_this_code_saves(tmp_path) -> None:
    """The committed v1 fixture is the format this code writes (same keys, same config fields)."""
    fixture = FIXTURES / "v1" / LINE / "vit" / "adapters"
    model, _ = _load_fixture(FIXTURES / "v1" / LINE / "vit", "vit")
    model.save_pretrained(tmp_path, selected_adapters=["default", "single"])
    for sub in ("", "single"):
        saved, committed = (
            load_file(str(tmp_path / sub / "adapter_model.safetensors")),
            load_file(str(fixture / sub / "adapter_model.safetensors")),
        )
        assert saved.keys() == committed.keys()
        assert all(torch.equal(saved[k], committed[k]) for k in saved)
        ours = json.loads((tmp_path / sub / "adapter_config.json").read_text())
        theirs = json.loads((fixture / sub / "adapter_config.json").read_text())
        assert ours.keys() == theirs.keys() and ours["target_modules"] == theirs["target_modules"]


def test_a_010_adapter_that_does_not_fit_is_refused_and_the_model_kept() -> None:
    base = _wider_vit()
    x = pixels((32, 32))
    with torch.no_grad():
        before = base(pixel_values=x).logits
    with pytest.raises(MonaCheckpointError, match=r"wrong shape.*needs \[8, 48\].*hidden size 48"):
        PeftModel.from_pretrained(base, FIXTURES / "v0.1.0" / LINE / "vit" / "adapters")
    assert not any(isinstance(m, MonaLayer) for m in base.modules())
    with torch.no_grad():
        assert torch.equal(base(pixel_values=x).logits, before)


def _wider_vit(num_labels: int = 3) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32, patch_size=8
    )
    config.num_labels = num_labels
    return BASES["vit"](config).eval()


def test_a_config_read_from_an_adapter_can_start_a_new_adapter_on_another_model() -> None:
    """Nothing hidden rides on a loaded config: reused for a new adapter on a wider ViT, it just makes one."""
    config = MonaConfig.from_pretrained(FIXTURES / "v1" / LINE / "vit" / "adapters")
    model = get_peft_model(_wider_vit(num_labels=5), config)
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    assert layer.hidden_size == 48 and layer.adapters_of("default")["attention"].down.out_features == 8
    with torch.no_grad():
        assert model(pixel_values=pixels((32, 32))).logits.shape == (2, 5)


OTHER_LINE = os.environ.get("MONA_OTHER_LINE_PYTHON")

_SAVE_OR_LOAD = textwrap.dedent(
    """
    import sys, torch, transformers
    from pathlib import Path
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    import mona_peft
    family, mode, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cls = {"vit": transformers.ViTForImageClassification, "swin": transformers.SwinForImageClassification}[family]
    base = cls.from_pretrained(root / "base").eval()
    x = load_file(str(root / "input.safetensors"))["x"]
    if mode == "save":
        torch.manual_seed(1)
        model = get_peft_model(base, mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / "adapter")
    else:
        model = PeftModel.from_pretrained(base, root / "adapter")
    with torch.no_grad():
        logits = model.eval()(pixel_values=x).logits
    save_file({"logits": logits.contiguous()}, str(root / f"logits_{mode}.safetensors"))
    print(transformers.__version__)
    """
)


def _run(python: str, *args: str) -> str:
    done = subprocess.run([python, "-c", _SAVE_OR_LOAD, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.skipif(not OTHER_LINE, reason="MONA_OTHER_LINE_PYTHON (the other transformers line's python) not set")
@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("direction", ["here_to_there", "there_to_here"])
def test_adapters_travel_between_transformers_lines(tmp_path, family: str, direction: str) -> None:
    torch.manual_seed(0)
    FAMILIES[family].build().save_pretrained(tmp_path / "base")
    from safetensors.torch import save_file

    save_file({"x": pixels((32, 32))}, str(tmp_path / "input.safetensors"))
    saver, loader = (sys.executable, OTHER_LINE) if direction == "here_to_there" else (OTHER_LINE, sys.executable)
    versions = {_run(saver, family, "save", str(tmp_path)), _run(loader, family, "load", str(tmp_path))}
    assert len(versions) == 2, versions  # really two transformers lines
    saved = load_file(str(tmp_path / "logits_save.safetensors"))["logits"]
    loaded = load_file(str(tmp_path / "logits_load.safetensors"))["logits"]
    torch.testing.assert_close(loaded, saved, atol=1e-5, rtol=0)
    assert not torch.equal(saved, torch.zeros_like(saved))


_SIGLIP2_SAVE_OR_LOAD = textwrap.dedent(
    """
    import sys, torch, transformers
    from pathlib import Path
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    import mona_peft
    mode, root = sys.argv[1], Path(sys.argv[2])
    base, info = transformers.Siglip2VisionModel.from_pretrained(root / "base", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = base.eval()
    inputs = load_file(str(root / "input.safetensors"))
    if mode == "save":
        torch.manual_seed(1)
        model = get_peft_model(base, mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / "adapter")
    else:
        model = PeftModel.from_pretrained(base, root / "adapter")
    with torch.no_grad():
        hidden = model.eval()(**inputs).last_hidden_state
    save_file({"hidden": hidden.contiguous()}, str(root / f"hidden_{mode}.safetensors"))
    print(transformers.__version__)
    """
)


@pytest.mark.skipif(not OTHER_LINE, reason="MONA_OTHER_LINE_PYTHON (the other transformers line's python) not set")
@pytest.mark.parametrize("direction", ["here_to_there", "there_to_here"])
def test_siglip2_naflex_adapters_travel_between_transformers_lines(tmp_path, direction: str) -> None:
    """SigLIP2's vision blocks are ``encoder.layers.N`` on 5.x and ``vision_model.encoder.layers.N`` on 4.57; the
    adapter names them the Hub's way and reloads on the other line to the same outputs, padded images included."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, num_patches=16
    )
    # The base in the Hub's key spelling (``vision_model.`` first), which both lines read; 5.x's own save_pretrained
    # drops the prefix and 4.57 would silently load a random base from it.
    state = transformers.Siglip2VisionModel(config).state_dict()
    state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v.contiguous() for k, v in state.items()}
    config.save_pretrained(tmp_path / "base")
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0, :15], mask[1, :16] = 1, 1
    inputs = {
        "pixel_values": torch.randn(2, 20, 48, generator=generator),
        "pixel_attention_mask": mask,
        "spatial_shapes": torch.tensor([[3, 5], [4, 4]]),
    }
    save_file(inputs, str(tmp_path / "input.safetensors"))
    saver, loader = (sys.executable, OTHER_LINE) if direction == "here_to_there" else (OTHER_LINE, sys.executable)
    versions = set()
    for python, mode in ((saver, "save"), (loader, "load")):
        done = subprocess.run(
            [python, "-c", _SIGLIP2_SAVE_OR_LOAD, mode, str(tmp_path)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        versions.add(done.stdout.strip())
    assert len(versions) == 2, versions  # really two transformers lines
    blocks = {k.split(".mona_")[0] for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))}
    assert blocks == {f"base_model.model.vision_model.encoder.layers.{i}" for i in range(2)}
    saved = load_file(str(tmp_path / "hidden_save.safetensors"))["hidden"]
    loaded = load_file(str(tmp_path / "hidden_load.safetensors"))["hidden"]
    torch.testing.assert_close(loaded, saved, atol=1e-5, rtol=0)
    assert not torch.equal(saved, torch.zeros_like(saved))


# The vision-tower families, whose block paths differ between the lines (CLIP/SigLIP vision models, LLaVA, BEiT,
# DINOv3) or not (Data2Vec-vision). Not CLIPModel: its text pooling differs between the lines for a tiny vocabulary
# (4.57 pools at argmax(input_ids), 5.x at the configured eos token), with or without Mona. All families go through
# one process per step. The bases are saved by
# the 4.57 line, in the Hub's spelling: 5.x writes CLIP's, SigLIP's and LLaVA's towers in its own spelling, which
# 4.57 cannot read.
TOWER_FAMILIES = ["dinov3", "clip_vision", "llava", "siglip_vision", "beit", "data2vec_vision"]

_TOWER_STEP = textwrap.dedent(
    """
    import sys, torch, transformers
    from pathlib import Path
    from peft import PeftModel, get_peft_model
    from safetensors.torch import save_file
    import mona_peft
    step, root, tests = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, tests)
    from tiny_vision_towers import TOWERS, perturb_trainable, tensors
    for family in sys.argv[4:]:
        tower, where = TOWERS[family], root / family
        if step == "base":
            tower.build().save_pretrained(where / "base")
            continue
        base = type(tower.build()).from_pretrained(where / "base").eval()
        if step == "save":
            model = get_peft_model(base, mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False))
            perturb_trainable(model, seed=1)
            model.save_pretrained(where / "adapter")
        else:
            model = PeftModel.from_pretrained(base, where / "adapter")
        with torch.no_grad():  # the logits or the last hidden state (LLaVA's caches differ between the lines)
            out = tensors(model.eval()(**tower.inputs(tower.sizes()[-1])))[0]
        save_file({"out": out.contiguous()}, str(where / f"out_{step}.safetensors"))
    print(transformers.__version__)
    """
)


def _run_towers(python: str, step: str, root: Path) -> str:
    command = [python, "-c", _TOWER_STEP, step, str(root), str(Path(__file__).parent), *TOWER_FAMILIES]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not OTHER_LINE, reason="MONA_OTHER_LINE_PYTHON (the other transformers line's python) not set")
@pytest.mark.parametrize("direction", ["here_to_there", "there_to_here"])
def test_vision_tower_adapters_travel_between_transformers_lines(tmp_path, direction: str) -> None:
    line_457 = sys.executable if LINE == "tf457" else OTHER_LINE
    _run_towers(line_457, "base", tmp_path)
    saver, loader = (sys.executable, OTHER_LINE) if direction == "here_to_there" else (OTHER_LINE, sys.executable)
    versions = {_run_towers(saver, "save", tmp_path), _run_towers(loader, "load", tmp_path)}
    assert len(versions) == 2, versions  # really two transformers lines
    for family in TOWER_FAMILIES:
        saved = load_file(str(tmp_path / family / "out_save.safetensors"))
        loaded = load_file(str(tmp_path / family / "out_load.safetensors"))
        torch.testing.assert_close(loaded["out"], saved["out"], atol=1e-5, rtol=0, msg=family)
        with safe_open(str(tmp_path / family / "adapter" / "adapter_model.safetensors"), "pt") as f:
            assert any(".mona_attn." in k for k in f.keys()), family  # noqa: SIM118 (safe_open is no dict)
