"""scripts/predict.py on a detector trained by scripts/train_detection.py: boxes, labels and scores in pixels of the
original images (JSON and plain), PNGs with the boxes drawn, the task read from the saved config, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hub_server import HubServer
from mona_peft.training import DataError, ModelError, TrainedClassifier, load_trained, parse_args, train
from mona_peft.training.inference import trained_task
from training_helpers import (
    PREDICT_SCRIPT,
    make_image_folder,
    make_tiny_checkpoint,
    one_thread,  # noqa: F401  (autouse: one torch thread)
    run_script,
    tiny_detection_args,
    tiny_train_args,
    write_coco,
)

pytest.importorskip("scipy", reason="training a DETR-family detector needs scipy (the detection extra)")
pytest.importorskip("pycocotools", reason="the detection extra: pip install 'mona-peft[detection]'")

from mona_peft.training.detection import DetectionPreprocessing  # noqa: E402
from mona_peft.training.detection import main as detection_main  # noqa: E402
from mona_peft.training.detection.inference import Detection, TrainedDetector, postprocessor  # noqa: E402
from mona_peft.training.detection.model import detector_config  # noqa: E402
from mona_peft.training.detection.task import coco_map_metrics  # noqa: E402

LABELS = {"red", "green"}


@pytest.fixture(scope="module")
def predict() -> ModuleType:
    """scripts/predict.py as a module, to call its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("predict_script", PREDICT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mona adapter on a tiny Deformable DETR, trained two steps on rectangles (classes red, green)."""
    root = tmp_path_factory.mktemp("detector")
    data = write_coco(root / "coco", count=20)
    out = root / "run"
    detection_main(tiny_detection_args(make_tiny_checkpoint(root / "dinov2", "dinov2"), data, out))
    return out


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classifier")
    model = make_tiny_checkpoint(root / "model", "dinov2")
    images = make_image_folder(root / "images", per_class=4)
    argv = tiny_train_args(model, images, root / "run", "--eval_strategy", "no", "--save_strategy", "no")
    return train(*parse_args([*argv, "--max_steps", "1"])).output_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two images of other sizes than the training ones, one not square, with filled rectangles."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, (width, height), box in [("wide", (80, 40), (10, 5, 40, 30)), ("square", (48, 48), (20, 8, 44, 30))]:
        pixels = np.full((height, width, 3), 30, np.uint8)
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = (255, 0, 0)
        Image.fromarray(pixels).save(root / f"{name}.png")
        paths.append(str(root / f"{name}.png"))
    return paths


def _json_rows(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_json_detections_are_in_pixels_above_threshold_and_sorted(
    predict: ModuleType, detector_dir: Path, images: list[str], capsys: pytest.CaptureFixture
) -> None:
    detector = load_trained(detector_dir)
    assert isinstance(detector, TrainedDetector) and detector.id2label == {0: "red", 1: "green"}
    everything = detector.predict(images, threshold=0.0, top_k=1000)
    scores = sorted(d.score for found in everything for d in found)
    threshold = round(scores[len(scores) // 2], 6)  # about half of the detections are above it
    predict.main(["--model", str(detector_dir), "--json", "--threshold", str(threshold), *images])
    rows = _json_rows(capsys.readouterr().out)
    assert [row["image"] for row in rows] == images
    for row, found in zip(rows, everything, strict=True):
        width, height = Image.open(row["image"]).size
        kept = [d for d in found if d.score > threshold]
        assert 0 < len(row["detections"]) == len(kept) < len(found)
        assert [d["score"] for d in row["detections"]] == pytest.approx([d.score for d in kept])
        assert [d["score"] for d in row["detections"]] == sorted((d["score"] for d in row["detections"]), reverse=True)
        for d in row["detections"]:
            assert d["label"] in LABELS and d["score"] > threshold
            xmin, ymin, xmax, ymax = d["box"]
            assert 0 <= xmin <= xmax <= width and 0 <= ymin <= ymax <= height


def test_boxes_are_the_models_boxes_scaled_to_the_original_image(detector_dir: Path, images: list[str]) -> None:
    detector = load_trained(detector_dir)
    wide = Image.open(images[0]).convert("RGB")  # 80 x 40: width and height swapped would show
    (found,) = detector.predict([wide], threshold=0.0, top_k=1)
    pixels = detector.preprocessing.example(wide, {"bbox": [], "category": []})["pixel_values"][None]
    with torch.no_grad():
        outputs = detector.model(pixel_values=pixels)
    scores = outputs.logits[0].sigmoid()  # Deformable DETR: a sigmoid score per (query, class)
    best = int(scores.flatten().argmax())
    query, label = divmod(best, scores.shape[1])
    cx, cy, w, h = outputs.pred_boxes[0, query].tolist()
    corners = np.clip(np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * [80, 40, 80, 40], 0, [80, 40] * 2)
    assert found[0].label == detector.id2label[label] and found[0].score == pytest.approx(float(scores.max()))
    assert found[0].box == pytest.approx(tuple(corners), abs=0.01)


def test_top_k_caps_the_detections_and_plain_output_has_a_line_each(
    predict: ModuleType, detector_dir: Path, images: list[str], capsys: pytest.CaptureFixture
) -> None:
    predict.main(["--model", str(detector_dir), "--threshold", "0", "--top_k", "3", *images])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [images[0]] * 3 + [images[1]] * 3
    label, score, *box = lines[0].split(": ")[1].split()
    assert label in LABELS and 0 < float(score) <= 1 and len(box) == 4


def test_adapter_dir_loads_identically_twice(detector_dir: Path, images: list[str]) -> None:
    first = load_trained(detector_dir).predict(images, threshold=0.0)
    second = load_trained(detector_dir, device="cpu").predict(images, threshold=0.0)
    assert first == second and all(len(found) > 0 for found in first)


def test_draw_dir_writes_pngs_and_refuses_to_overwrite(
    predict: ModuleType, detector_dir: Path, images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    draw_dir = tmp_path / "new" / "boxes"
    argv = ["--model", str(detector_dir), "--threshold", "0", "--top_k", "2", "--json", "--draw_dir", str(draw_dir)]
    predict.main([*argv, *images])
    rows = _json_rows(capsys.readouterr().out)
    drawn = [draw_dir / f"{Path(image).stem}.boxes.png" for image in images]
    for path, row in zip(drawn, rows, strict=True):
        original = np.asarray(Image.open(row["image"]).convert("RGB"), dtype=np.int16)
        picture = Image.open(path)
        assert picture.format == "PNG" and picture.size == (original.shape[1], original.shape[0])
        changed = np.abs(np.asarray(picture.convert("RGB"), dtype=np.int16) - original).sum(-1) > 0
        xmin, ymin, xmax, ymax = (round(v) for v in row["detections"][0]["box"])
        for x in (xmin, xmax):  # the best box's left and right edges are drawn (within a pixel)
            assert changed[ymin + 1 : ymax, max(x - 1, 0) : x + 2].any(axis=1).all()
        assert not changed.all()  # the rest of the image is the image
    before = [path.read_bytes() for path in drawn]
    with pytest.raises(DataError, match=r"already exist.*--overwrite"):
        predict.main([*argv, *images])
    assert [path.read_bytes() for path in drawn] == before
    Image.new("RGB", (5, 5)).save(drawn[0])
    predict.main([*argv, "--overwrite", *images])
    assert Image.open(drawn[0]).size == Image.open(images[0]).size


def test_task_is_read_from_the_saved_config(
    predict: ModuleType, detector_dir: Path, classifier_dir: Path, images: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert trained_task(transformers.AutoConfig.from_pretrained(detector_dir)) == "detection"
    assert trained_task(transformers.AutoConfig.from_pretrained(classifier_dir)) == "classification"
    assert isinstance(load_trained(classifier_dir), TrainedClassifier)
    assert isinstance(load_trained(detector_dir, task="detection"), TrainedDetector)
    with pytest.raises(ModelError, match="holds an object detector.*not a model for classification"):
        load_trained(detector_dir, task="classification")
    with pytest.raises(ModelError, match="holds an image classifier.*not a model for detection"):
        load_trained(classifier_dir, task="detection")
    with pytest.raises(ModelError, match="base_model applies to classifier adapters only"):
        load_trained(detector_dir, base_model=str(classifier_dir))
    predict.main(["--model", str(classifier_dir), "--json", "--top_k", "2", images[0]])
    (row,) = _json_rows(capsys.readouterr().out)
    assert len(row["predictions"]) == 2 and "detections" not in row


@pytest.mark.parametrize("option", [["--threshold", "0.3"], ["--draw_dir", "boxes"]])
def test_detection_options_with_a_classifier_are_refused(
    predict: ModuleType, classifier_dir: Path, images: list[str], tmp_path: Path, option: list[str]
) -> None:
    with pytest.raises(ModelError, match=f"is an image classifier; {option[0]} only apply to detection"):
        predict.main(["--model", str(classifier_dir), *option, images[0]])
    assert not (Path.cwd() / "boxes").exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan?"])
def test_threshold_outside_zero_one_is_an_argparse_error(
    predict: ModuleType, value: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        predict.parse_args(["--model", "m", "--threshold", value, "x.png"])
    assert exit_info.value.code == 2 and "--threshold" in capsys.readouterr().err
    assert predict.parse_args(["--model", "m", "--threshold", "1", "x.png"]).threshold == 1.0


def test_undecodable_image_is_a_clear_error(detector_dir: Path, images: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="Cannot read the image.*broken.png"):
        load_trained(detector_dir).predict([images[0], broken])
    result = run_script([str(PREDICT_SCRIPT), "--model", str(detector_dir), "--draw_dir", str(tmp_path), str(broken)])
    assert result.returncode == 1 and "error: Cannot read the image" in result.stderr and "broken.png" in result.stderr
    assert not list(tmp_path.glob("*.boxes.png"))


def _tiny_detector_config(detector: str) -> transformers.PretrainedConfig:
    """A new ``detector`` (five queries, classes red and green) on a tiny random DINOv2."""
    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=8, out_features=["stage2"]
    )
    sizes = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "num_queries": 5}
    return detector_config(backbone, detector, ["red", "green"], sizes)


@pytest.mark.parametrize("detector", ["deformable_detr", "detr"])
def test_the_metric_and_predict_decode_the_same_detections(detector: str) -> None:
    """Two decoders read a detector's outputs: the mAP metric's (``task.decode`` / ``decode_softmax``: every top-k
    detection, COCO [x, y, w, h] in pixels of the square model input) and predict's (the image processor's
    ``post_process_object_detection``: above a threshold, corners in pixels of the original image). On an image of
    the model input's size, with no threshold, both must report the same labels, scores and boxes, best first."""
    torch.manual_seed(0)
    config = _tiny_detector_config(detector)
    model = transformers.AutoModelForObjectDetection.from_config(config).eval()
    size = 32
    preprocessing = DetectionPreprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    predictor = TrainedDetector(model, postprocessor(config), {0: "red", 1: "green"}, preprocessing)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    (predicted,) = predictor.predict([image], threshold=0.0, top_k=1000)

    class Recorder:  # the COCO metric's stand-in: keeps what the metric's decoder hands it
        found: list[dict] = []

        def compute(self, predictions: list[dict], references: list[dict], num_labels: int) -> dict:
            self.found = predictions
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "per_class_ap": [0.0] * num_labels}

    with torch.no_grad():
        outputs = model(pixel_values=preprocessing.example(image, {"bbox": [], "category": []})["pixel_values"][None])
    recorder = Recorder()
    no_objects = {"boxes": np.zeros((0, 4)), "class_labels": np.zeros(0, np.int64)}
    batches = [(outputs.logits.numpy(), outputs.pred_boxes.numpy())]
    coco_map_metrics(recorder, ["red", "green"], size)(transformers.EvalPrediction(batches, [[no_objects]]))
    (found,) = recorder.found
    order = np.argsort(-found["scores"], kind="stable")
    x, y, w, h = found["boxes"][order].T
    corners = np.clip(np.stack([x, y, x + w, y + h], axis=1), 0, size)
    queries = config.num_queries * (config.num_labels if detector == "deformable_detr" else 1)
    assert len(predicted) == len(order) == queries
    assert [d.label for d in predicted] == [("red", "green")[label] for label in found["labels"][order]]
    assert [d.score for d in predicted] == pytest.approx(found["scores"][order].tolist(), rel=1e-6)
    np.testing.assert_allclose([d.box for d in predicted], corners, atol=0.01)


def test_a_full_detector_with_its_image_processor_predicts(tmp_path: Path, images: list[str]) -> None:
    """A detector saved outside the recipe (no detection.json): its own image processor preprocesses."""
    torch.manual_seed(0)
    config = _tiny_detector_config("deformable_detr")
    transformers.DeformableDetrForObjectDetection(config).save_pretrained(tmp_path)
    type(postprocessor(config))(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(tmp_path)
    detector = load_trained(tmp_path)
    assert isinstance(detector, TrainedDetector) and detector.preprocessing is None
    found = detector.predict(images, threshold=0.0, top_k=4)
    assert [len(f) for f in found] == [4, 4]
    for path, detections in zip(images, found, strict=True):
        width, height = Image.open(path).size
        for d in detections:
            assert isinstance(d, Detection) and d.label in LABELS
            assert 0 <= d.box[0] <= d.box[2] <= width and 0 <= d.box[1] <= d.box[3] <= height


def test_a_detector_from_the_hub_predicts_as_the_local_copy(
    detector_dir: Path, images: list[str], tmp_path: Path
) -> None:
    token, repo = "hf_alice_write_token", "alice/mona-tiny-detector"
    with HubServer(users={token: "alice"}) as hub:
        env = {
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "home"),
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        upload = (
            "import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\napi.create_repo(sys.argv[1])\n"
            "api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], ignore_patterns=['checkpoint-*'])\n"
        )
        result = run_script(["-c", upload, repo, str(detector_dir)], **env)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run_script([str(PREDICT_SCRIPT), "--model", repo, "--json", "--threshold", "0", *images], **env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not hub.unhandled, hub.unhandled
    local = load_trained(detector_dir).predict(images, threshold=0.0)
    rows = _json_rows(result.stdout)
    for row, found in zip(rows, local, strict=True):
        assert [d["label"] for d in row["detections"]] == [d.label for d in found]
        np.testing.assert_allclose([d["box"] for d in row["detections"]], [d.box for d in found], atol=0.02)
        assert [d["score"] for d in row["detections"]] == pytest.approx([d.score for d in found], abs=1e-5)
