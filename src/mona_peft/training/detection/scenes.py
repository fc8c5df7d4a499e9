"""The offline default data for object detection: procedurally generated scenes of shapes with exact boxes.

Nothing real (no package found ships a real boxed image set offline, see docs/detection.md): every image is drawn from
a seed, as the segmentation scenes are (same noisy gradients, same hue range per class), but the one to four shapes
(disc, box, triangle) never overlap, so each box is the exact extent of its shape's geometry.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..segmentation.scenes import CLASS_HUES, random_colour

SCENE_LABELS = ("disc", "box", "triangle")
"""Class names of the generated objects; the index is the category id."""

SCENE_SIZE = 112
DEFAULT_NUM_SCENES = 480
DEFAULT_SCENE_SEED = 0
SCENES_DESCRIPTION = (
    "procedurally generated scenes (non-overlapping discs, boxes, triangles with exact boxes on noisy gradients; "
    "`mona_peft.training.detection.scenes`), not real images"
)


def draw_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> tuple[Image.Image, dict[str, list]]:
    """One RGB image and its objects ``{"bbox": [[x, y, w, h], ...], "category": [...]}`` drawn with ``rng``."""
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    start, end = (
        np.asarray(random_colour(rng, rng.uniform(), rng.uniform(0, 0.25)), dtype=np.float64) for _ in range(2)
    )
    angle = rng.uniform(0, 2 * math.pi)
    t = ((xs * math.cos(angle) + ys * math.sin(angle)) + 1.5)[..., None] / 3
    image = Image.fromarray(np.clip(start * (1 - t) + end * t, 0, 255).astype(np.uint8), "RGB")
    paint = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    categories: list[int] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, len(SCENE_LABELS)))
        radius = rng.uniform(0.08, 0.2) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        if cls == 0:
            points = None
            extent = (cx - radius, cy - radius, cx + radius, cy + radius)
        else:
            corners, aspect = (4, rng.uniform(0.6, 1.0)) if cls == 1 else (3, 1.0)
            rotation = rng.uniform(0, 2 * math.pi)
            points = [
                (cx + radius * math.cos(phi), cy + radius * aspect * math.sin(phi))
                for phi in (rotation + 2 * math.pi * k / corners for k in range(corners))
            ]
            extent = (
                min(p[0] for p in points),
                min(p[1] for p in points),
                max(p[0] for p in points),
                max(p[1] for p in points),
            )
        box = [extent[0], extent[1], extent[2] - extent[0], extent[3] - extent[1]]
        if any(_overlap(box, other) for other in boxes):
            continue
        colour = random_colour(rng, (CLASS_HUES[cls + 1] + rng.uniform(-0.06, 0.06)) % 1.0, rng.uniform(0.45, 1.0))
        if points is None:
            paint.ellipse(extent, fill=colour)
        else:
            paint.polygon(points, fill=colour)
        boxes.append(box)
        categories.append(cls)
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), {"bbox": boxes, "category": categories}


def _overlap(a: list[float], b: list[float], margin: float = 2.0) -> bool:
    return not (
        a[0] + a[2] + margin <= b[0]
        or b[0] + b[2] + margin <= a[0]
        or a[1] + a[3] + margin <= b[1]
        or b[1] + b[3] + margin <= a[1]
    )


def scene_dataset(num_scenes: int = DEFAULT_NUM_SCENES, seed: int = DEFAULT_SCENE_SEED, size: int = SCENE_SIZE):
    """A ``datasets.Dataset`` with ``image`` and ``objects`` columns: ``num_scenes`` scenes from ``seed`` (scene ``i``
    depends only on ``(seed, i)``)."""
    from datasets import Dataset

    from .data import OBJECT_FEATURES

    if num_scenes < 1:
        raise ValueError(f"num_scenes must be positive, got {num_scenes}")
    images, objects = zip(
        *(draw_scene(np.random.default_rng([seed, i]), size) for i in range(num_scenes)), strict=True
    )
    return Dataset.from_dict({"image": list(images), "objects": list(objects)}, features=OBJECT_FEATURES())
