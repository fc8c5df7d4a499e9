"""Top-k labels for image files, from a model fine-tuned by scripts/train.py (adapter + base model, or full model).

    python scripts/predict.py --model outputs/mona-dinov2-small-textile image1.jpg image2.png --top_k 3
    python scripts/predict.py --model user/my-mona-adapter --base_model facebook/dinov2-small photo.jpg --json

The logic lives in mona_peft.training.inference (load_trained).
"""

from __future__ import annotations

import argparse
import json
import sys

from mona_peft.training import DataError, load_trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="output directory of scripts/train.py, or a Hub repo id")
    parser.add_argument("--base_model", default=None, help="base model of an adapter (default: from adapter_config)")
    parser.add_argument("--top_k", type=int, default=3, help="labels per image (default: 3)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top_k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    classifier = load_trained(args.model, base_model=args.base_model, device=args.device, revision=args.revision)
    predictions = classifier.predict(args.images, top_k=args.top_k, batch_size=args.batch_size)
    for image, top in zip(args.images, predictions, strict=True):
        if args.json:
            scores = [{"label": label, "score": score} for label, score in top]
            print(json.dumps({"image": image, "predictions": scores}))
        else:
            print(f"{image}: " + ", ".join(f"{label} {score:.3f}" for label, score in top))


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:
        sys.exit(f"error: {exc}")
