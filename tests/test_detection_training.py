"""Object detection through the training pipeline (``scripts/train_detection.py``): the packaged COCO mAP metric
(pycocotools), the data (COCO folders, Hub-style datasets, generated scenes) and its bad input, box-aware transforms,
and a tiny end-to-end run of each method with save/reload."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mona_peft.training import DataError, OutputDirError

pytest.importorskip("pycocotools", reason="the detection extra: pip install 'mona-peft[detection]'")
pytest.importorskip("scipy", reason="the DETR family's Hungarian matcher needs scipy")

from mona_peft.metrics import COCO_MAP_PATH, load_coco_map  # noqa: E402
from mona_peft.training.detection import (  # noqa: E402
    DetectionDataArguments,
    DetectionModelArguments,
    DetectionPreprocessing,
    coco_folder,
    load_trained_detector,
    parse_detection_args,
    prepare_detection_data,
    scene_dataset,
)
from mona_peft.training.detection import main as detection_main  # noqa: E402
from mona_peft.training.detection.arguments import DETECTION_MAX_STEPS  # noqa: E402
from mona_peft.training.detection.data import _category_names, sanitise  # noqa: E402
from training_helpers import (  # noqa: E402
    REPO,
    make_tiny_checkpoint,
    one_thread,  # noqa: F401  (autouse)
    run_script,
    tiny_detection_args,
    write_coco,
)

SCRIPT = REPO / "scripts" / "train_detection.py"


# ------------------------------------------------------------------------------------------------------------ metric
TRUTH = [
    {"boxes": [[10, 10, 20, 20], [50, 40, 12, 30]], "labels": [0, 1]},
    {"boxes": [[5, 5, 30, 30]], "labels": [0]},
]


def _scored(references: list[dict], shift: float = 0.0) -> list[dict]:
    return [
        {
            "boxes": [[x + shift, y + shift, w, h] for x, y, w, h in r["boxes"]],
            "labels": r["labels"],
            "scores": [0.9] * len(r["labels"]),
        }
        for r in references
    ]


def test_coco_map_of_exact_predictions_is_one() -> None:
    metric = load_coco_map()
    result = metric.compute(predictions=_scored(TRUTH), references=TRUTH, num_labels=3)
    assert result["map"] == result["map_50"] == result["map_75"] == 1.0
    assert result["per_class_ap"][:2].tolist() == pytest.approx([1.0, 1.0]) and np.isnan(result["per_class_ap"][2])


def test_coco_map_of_shifted_boxes_is_below_one() -> None:
    import evaluate

    metric = evaluate.load(COCO_MAP_PATH, keep_in_memory=True)
    result = metric.compute(predictions=_scored(TRUTH, shift=4.0), references=TRUTH, num_labels=3)
    assert 0 <= result["map"] < 1 and result["map_75"] < result["map_50"] <= 1
    wrong_class = [{**p, "labels": [1 - c for c in p["labels"]]} for p in _scored(TRUTH)]
    assert metric.compute(predictions=wrong_class, references=TRUTH, num_labels=3)["map"] < 1
    none = [{"boxes": [], "labels": [], "scores": []} for _ in TRUTH]
    assert metric.compute(predictions=none, references=TRUTH, num_labels=3)["map"] == 0.0
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=_scored(TRUTH), references=TRUTH, num_labels=1)


# -------------------------------------------------------------------------------------------------------------- data
def _edit(root: Path, change) -> None:
    path = root / "annotations.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def _args(**kwargs: object) -> DetectionDataArguments:
    return DetectionDataArguments(**kwargs)


def test_coco_folder_loads_with_contiguous_classes(tmp_path: Path) -> None:
    dataset, names = coco_folder(write_coco(tmp_path))
    assert names == ["red", "green"] and len(dataset) == 8
    assert set(c for row in dataset["objects"] for c in row["category"]) <= {0, 1}
    data = prepare_detection_data(_args(train_dir=str(tmp_path)))
    assert data.labels == ["red", "green"] and not data.skipped
    assert sum(len(data.splits[s]) for s in ("train", "validation", "test")) == 8


def test_generated_scenes_have_exact_boxes_inside_the_image() -> None:
    scenes = scene_dataset(12)
    assert scenes[3]["objects"] == scene_dataset(4)[3]["objects"]  # scene i depends on (seed, i) only
    for row in scenes:
        assert row["objects"]["bbox"]
        for x, y, w, h in row["objects"]["bbox"]:
            assert min(x, y) >= 0 and x + w <= 112 and y + h <= 112 and w > 0 and h > 0
            crop = np.asarray(row["image"])[int(y) + 2 : int(y + h) - 2, int(x) + 2 : int(x + w) - 2]
            assert crop.size  # a shape is drawn where its box is


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["annotations"].append({**c["annotations"][0], "id": 99, "category_id": 7}), "category_id 7"),
        (lambda c: c["annotations"].append({**c["annotations"][0], "id": 99, "image_id": 42}), "image_id 42"),
        (lambda c: c["images"].append({"id": 50, "file_name": "gone.png", "width": 48, "height": 48}), "missing"),
        (lambda c: c["images"][0].update(width=64), "do not match the images"),
        (lambda c: c.pop("categories"), "not a COCO detection file"),
    ],
    ids=["unknown-category", "unknown-image", "missing-file", "wrong-size", "no-categories"],
)
def test_coco_file_that_does_not_match_is_refused(tmp_path: Path, change, message: str) -> None:
    _edit(write_coco(tmp_path), change)
    with pytest.raises(DataError, match=message):
        prepare_detection_data(_args(train_dir=str(tmp_path)))


def test_boxes_outside_and_empty_images_are_counted_skips(tmp_path: Path) -> None:
    def change(coco: dict) -> None:
        first = coco["annotations"][0]
        coco["annotations"].append({**first, "id": 90, "bbox": [40, 40, 30, 30]})  # partly outside: clipped
        coco["annotations"].append({**first, "id": 91, "bbox": [60, 60, 10, 10]})  # wholly outside: dropped
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]  # image 2: no annotation

    _edit(write_coco(tmp_path, count=10), change)
    data = prepare_detection_data(_args(train_dir=str(tmp_path)))
    assert data.skipped == {
        "train": {
            "boxes partly outside their image (clipped)": 1,
            "boxes without area inside their image (dropped)": 1,
            "images without any box (dropped)": 1,
        }
    }
    assert sum(len(data.splits[s]) for s in ("train", "validation", "test")) == 9
    boxes = [b for s in ("train", "validation", "test") for row in data.splits[s]["objects"] for b in row["bbox"]]
    assert all(x + w <= 48 and y + h <= 48 for x, y, w, h in boxes)


def test_no_annotations_at_all_is_an_error(tmp_path: Path) -> None:
    _edit(write_coco(tmp_path), lambda c: c.update(annotations=[]))
    with pytest.raises(DataError, match="No train image with a usable box"):
        prepare_detection_data(_args(train_dir=str(tmp_path)))


def test_undecodable_image_is_a_counted_skip_or_an_error(tmp_path: Path) -> None:
    write_coco(tmp_path, count=10)
    (tmp_path / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = prepare_detection_data(_args(train_dir=str(tmp_path)))
    assert data.skipped["train"]["undecodable images (dropped)"] == 1
    with pytest.raises(DataError, match="cannot be decoded"):
        prepare_detection_data(_args(train_dir=str(tmp_path), skip_undecodable_images=False))


def test_hub_style_objects_and_classes_outside_the_label_map() -> None:
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    objects = Sequence({"bbox": Sequence(Value("float32"), length=4), "category": ClassLabel(names=["a", "b"])})
    features = Features({"image": ImageFeature(), "objects": objects})
    image = Image.new("RGB", (40, 30))
    objects_of = [
        {"bbox": [[1, 2, 10, 10]], "category": [1]},
        {"bbox": [[0, 0, 5, 5], [3, 3, 4, 4]], "category": [0, 1]},
    ]
    rows = {"image": [image, image], "objects": objects_of}
    dataset = Dataset.from_dict(rows, features=features)
    assert _category_names(dataset, "objects") == ["a", "b"]  # the class names of cppe-5-style data
    clean, counts = sanitise(dataset, "train", "image", "objects", 2)
    assert not counts and clean[1]["objects"] == {"bbox": [[0, 0, 5, 5], [3, 3, 4, 4]], "category": [0, 1]}
    with pytest.raises(DataError, match="outside the label map"):
        sanitise(dataset, "train", "image", "objects", 1)


def test_augmentation_moves_the_boxes_with_the_image() -> None:
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[10:30, 5:25] = 255  # the object: x 5-25, y 10-30
    image = Image.fromarray(pixels)
    prep = DetectionPreprocessing(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_scale=0.5)
    flips = 0
    for seed in range(12):
        rng = random.Random(seed)
        example = prep.example(image, {"bbox": [[5, 10, 20, 20]], "category": [0]}, rng)
        cx, cy, w, h = (example["labels"]["boxes"][0] * 64).tolist()
        bright = example["pixel_values"][0] > 0.5
        ys, xs = torch.nonzero(bright, as_tuple=True)
        assert abs(xs.min() - (cx - w / 2)) <= 1.5 and abs(xs.max() + 1 - (cx + w / 2)) <= 1.5
        assert abs(ys.min() - (cy - h / 2)) <= 1.5 and abs(ys.max() + 1 - (cy + h / 2)) <= 1.5
        flips += cx > 32
    assert 0 < flips < 12  # some flipped, some not
    plain = prep.example(image, {"bbox": [[5, 10, 20, 20]], "category": [0]})
    torch.testing.assert_close(plain["labels"]["boxes"], torch.tensor([[15 / 80, 20 / 60, 20 / 80, 20 / 60]]))


# ------------------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-dinov2"), "dinov2")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), count=20)


def test_parse_detection_defaults() -> None:
    model_args, data_args, training_args = parse_detection_args([])
    assert model_args.method == "mona" and model_args.detector == "deformable_detr"
    assert training_args.eval_do_concat_batches is False and data_args.image_size == 112
    assert training_args.max_steps == DETECTION_MAX_STEPS  # the detector's own default budget, not classification's
    assert parse_detection_args(["--num_train_epochs", "2"])[2].max_steps == -1
    with pytest.raises(SystemExit):
        parse_detection_args(["--method", "linear"])


def test_drop_path_rate_is_refused_for_detection() -> None:
    """--drop_path_rate is image classification's (``DetectionModelArguments.supports_drop_path`` is False)."""
    message = r"--drop_path_rate applies to image classification \(scripts/train.py\) only"
    with pytest.raises(ValueError, match=message):
        parse_detection_args(["--drop_path_rate", "0.3"])
    with pytest.raises(ValueError, match=message):
        DetectionModelArguments(drop_path_rate=0.3)
    assert DetectionModelArguments().drop_path_rate is None


@pytest.mark.parametrize("method", ["mona", "lora", "full"])
def test_methods_train_and_reload(method: str, tiny_dinov2: Path, coco_data: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    result = detection_main(tiny_detection_args(tiny_dinov2, coco_data, out, "--method", method))
    assert 0 <= result.metrics["test_map"] <= 1 and {"test_map_50", "test_ap_red"} <= set(result.metrics)
    model = result.trainer.model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "mona":
        assert any(".mona" in n or "mona_" in n for n in trainable)
        assert not any(".backbone." in n and "mona" not in n for n in trainable)
    elif method == "lora":
        assert not any(".backbone." in n and "lora_" not in n for n in trainable)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reloaded = load_trained_detector(out)
    with torch.no_grad():
        expected, got = model(pixel_values=pixels), reloaded(pixel_values=pixels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-5)
    with pytest.raises(OutputDirError, match="already holds a trained model"):
        detection_main(tiny_detection_args(tiny_dinov2, coco_data, out, "--method", method))


def test_cli_end_to_end(tiny_dinov2: Path, coco_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = run_script([str(SCRIPT), *tiny_detection_args(tiny_dinov2, coco_data, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Held-out test mAP" in result.stdout
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "- mona" in card and "- object-detection" in card
    assert "test_map" in json.loads((out / "results.json").read_text())
    assert (out / "training_curves.png").is_file() and (out / "detection.json").is_file()
    bad = run_script([str(SCRIPT), *tiny_detection_args(tiny_dinov2, tmp_path, tmp_path / "x")])
    assert bad.returncode != 0 and "error:" in bad.stderr and "annotations.json" in bad.stderr
