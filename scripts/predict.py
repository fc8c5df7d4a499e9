"""Predict for image files with a model fine-tuned by scripts/train.py (top-k labels) or scripts/train_detection.py
(boxes, labels and scores; optionally PNGs with the boxes drawn): an adapter + base model, or a full model.

    python scripts/predict.py --model outputs/mona-dinov2-small-textile image1.jpg image2.png --top_k 3
    python scripts/predict.py --model user/my-mona-adapter --base_model facebook/dinov2-small photo.jpg --json
    python scripts/predict.py --model outputs/det-mona-... scene.png --threshold 0.3 --json --draw_dir boxes/

The task is read from the saved config (--task auto): a detector (a *ForObjectDetection model) gets detection, anything
else classification. Classification prints "image: label score, ..." per image (--json: {"image", "predictions":
[{"label", "score"}]}); detection prints one line per detection, "image: label score xmin ymin xmax ymax" in pixels of
the image (--json: {"image", "detections": [{"label", "score", "box": [xmin, ymin, xmax, ymax]}]}), and with
--draw_dir writes <stem>.boxes.png per image (an existing file is an error unless --overwrite).

The logic lives in mona_peft.training.inference (load_trained) and mona_peft.training.detection.inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mona_peft.training import DataError, ModelError, TrainedClassifier, load_trained

if TYPE_CHECKING:
    from mona_peft.training.detection.inference import TrainedDetector

DETECTION_ONLY = ("threshold", "draw_dir", "overwrite")
DEFAULT_TOP_K = {"classification": 3, "detection": 100}


def probability(text: str) -> float:
    """An argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="output directory of a training script, or a Hub repo id")
    parser.add_argument(
        "--task",
        choices=("auto", "classification", "detection"),
        default="auto",
        help="auto (default): from the saved config; a task that does not match the model is an error",
    )
    parser.add_argument(
        "--base_model", default=None, help="base model of a classifier adapter (default: from adapter_config)"
    )
    parser.add_argument(
        "--top_k", type=int, default=None, help="labels per image (default: 3), or most detections per image (100)"
    )
    parser.add_argument(
        "--threshold", type=probability, default=None, help="detection: lowest score kept, in [0, 1] (default: 0.5)"
    )
    parser.add_argument("--draw_dir", type=Path, default=None, help="detection: write <stem>.boxes.png here")
    parser.add_argument("--overwrite", action="store_true", help="detection: replace existing files in --draw_dir")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top_k must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.task == "classification" and (given := _detection_options(args)):
        parser.error(f"{', '.join(given)} only apply to detection")
    return args


def _detection_options(args: argparse.Namespace) -> list[str]:
    return [f"--{name}" for name in DETECTION_ONLY if getattr(args, name) not in (None, False)]


def draw_paths(images: list[str], draw_dir: Path, overwrite: bool) -> list[Path]:
    """``draw_dir/<stem>.boxes.png`` for each image; an existing file (unless ``overwrite``) or two images with the
    same stem are a :class:`DataError`, raised before anything is predicted or written."""
    paths = [draw_dir / f"{Path(image).stem}.boxes.png" for image in images]
    clashes = sorted({str(p) for p in paths if paths.count(p) > 1})
    if clashes:
        raise DataError(f"Several images would be drawn to the same file: {', '.join(clashes)}; rename them.")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or another --draw_dir.")
    return paths


def classify(classifier: TrainedClassifier, args: argparse.Namespace) -> None:
    """Print the top labels of each image."""
    top_k = args.top_k or DEFAULT_TOP_K["classification"]
    predictions = classifier.predict(args.images, top_k=top_k, batch_size=args.batch_size)
    for image, top in zip(args.images, predictions, strict=True):
        if args.json:
            scores = [{"label": label, "score": score} for label, score in top]
            print(json.dumps({"image": image, "predictions": scores}))
        else:
            print(f"{image}: " + ", ".join(f"{label} {score:.3f}" for label, score in top))


def detect(detector: TrainedDetector, args: argparse.Namespace) -> None:
    """Print the detections of each image, and draw them in ``--draw_dir``."""
    from mona_peft.training.data import load_image
    from mona_peft.training.detection.inference import DEFAULT_THRESHOLD, draw_detections

    drawings = draw_paths(args.images, args.draw_dir, args.overwrite) if args.draw_dir else None
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    top_k = args.top_k or DEFAULT_TOP_K["detection"]
    found = detector.predict(args.images, threshold=threshold, top_k=top_k, batch_size=args.batch_size)
    for i, (image, detections) in enumerate(zip(args.images, found, strict=True)):
        if args.json:
            print(json.dumps({"image": image, "detections": [d.as_dict() for d in detections]}))
        elif not detections:
            print(f"{image}: no detection above {threshold}")
        for d in [] if args.json else detections:
            print(f"{image}: {d.label} {d.score:.3f} " + " ".join(f"{v:.1f}" for v in d.box))
        if drawings:
            drawings[i].parent.mkdir(parents=True, exist_ok=True)
            draw_detections(load_image(image), detections).save(drawings[i], format="PNG")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_trained(
        args.model, base_model=args.base_model, device=args.device, task=args.task, revision=args.revision
    )
    if isinstance(model, TrainedClassifier):
        if given := _detection_options(args):
            raise ModelError(f"{args.model} is an image classifier; {', '.join(given)} only apply to detection.")
        classify(model, args)
    else:
        detect(model, args)


if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError) as exc:
        sys.exit(f"error: {exc}")
