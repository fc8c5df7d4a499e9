"""Tiny checkpoints, image folders and COCO folders for the training tests (everything made locally, nothing
downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
PREDICT_SCRIPT = REPO / "scripts" / "predict.py"

_PROCESSORS = {
    # DINOv2's processor resizes the shorter side and centre-crops; ViT's resizes straight to the size.
    "dinov2": {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 36},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    },
    "vit": {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}


def make_tiny_checkpoint(directory: Path, family: str = "dinov2", with_processor: bool = True) -> Path:
    """Save a tiny random backbone (no head, like a pretrained checkpoint) with a preprocessor config."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    if family == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **common))
    elif family == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=48, **common), add_pooling_layer=False)
    elif family == "convnext":  # a vision model Mona cannot wrap (no transformer blocks)
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
        model = transformers.ConvNextModel(config)
    elif family == "bert":  # not an image model at all
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=100
        )
        model = transformers.BertModel(config)
    else:
        raise ValueError(family)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if with_processor:
        processor = _PROCESSORS["vit" if family in ("vit", "convnext", "bert") else "dinov2"]
        (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory


def make_image_folder(
    root: Path, classes: tuple[str, ...] = ("circle", "square", "stripes"), per_class: int = 12, seed: int = 0
) -> Path:
    """An image folder (root/<class>/<n>.png) whose classes differ in colour, so a few steps can learn them."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
            noise = rng.integers(0, 60, size=(size[1], size[0], 3))
            pixels = np.clip(np.array(colours[c % len(colours)]) + noise - 30, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def tiny_train_args(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Command-line arguments for a fast run on the tiny model."""
    return [
        "--model_name_or_path", str(model_dir),
        "--train_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--image_size", "32",
        "--bottleneck_dim", "8",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_steps", "4",
        "--learning_rate", "1e-2",
        *extra,
    ]  # fmt: skip


def write_coco(root: Path, count: int = 8, size: int = 48, seed: int = 0) -> Path:
    """A COCO folder: ``count`` images with one or two filled rectangles each, and annotations.json (ids from 1)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels = np.zeros((size, size, 3), np.uint8)
        for _ in range(1 + i % 2):
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            w, h = (int(v) for v in rng.integers(8, size // 2, 2))
            category = int(rng.integers(1, 3))
            pixels[y : y + h, x : x + w] = (255, 0, 0) if category == 1 else (0, 255, 0)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": category, "bbox": [x, y, w, h],
                 "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def tiny_detection_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """Command-line arguments of ``scripts/train_detection.py`` for a two-step run of a tiny detector (d_model 32, four
    queries) on a tiny backbone (:func:`make_tiny_checkpoint`) and a COCO folder (:func:`write_coco`)."""
    return [
        "--model_name_or_path", str(model), "--train_dir", str(data), "--output_dir", str(output),
        "--image_size", "32", "--bottleneck_dim", "8", "--d_model", "32", "--num_queries", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "2", *extra,
    ]  # fmt: skip


def offline_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_script(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in a fresh process (offline), capturing its output."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=offline_env(**env), cwd=REPO
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy machine more threads only contend (10-50x slower). A test
    module turns it on by importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
