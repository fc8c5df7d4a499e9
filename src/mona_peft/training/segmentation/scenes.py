"""The offline default data for semantic segmentation: procedurally generated scenes of simple shapes.

Nothing real: every image is drawn from a seed (numpy + PIL), so the set is the same on every machine and needs no
download. A scene is a smooth, weakly coloured random gradient with pixel noise, on which one to four shapes (disc,
box, triangle) of random size, position and rotation are drawn, later ones occluding earlier ones; the mask holds the
class of the topmost shape at each pixel (0 = background). Each class has its own hue range (discs reddish, boxes
greenish, triangles bluish; saturation and brightness vary), so colour alone gives most of the answer away: the set
checks that a segmentation pipeline learns within a CPU budget of minutes, it is not a benchmark of anything the
paper measured.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SCENE_LABELS = ("background", "disc", "box", "triangle")
"""Class names of the generated scenes; the index is the mask value."""

CLASS_HUES = (None, 0.0, 0.33, 0.63)
"""Centre of the hue range (0-1) of each shape class; background hues are free but their saturation is low."""

SCENE_SIZE = 80
"""Side of the generated images in pixels (larger than the default model input, so training crops vary)."""

DEFAULT_NUM_SCENES = 600
DEFAULT_SCENE_SEED = 0
SCENES_DESCRIPTION = (
    "procedurally generated scenes (discs, boxes, triangles with a hue range per class on noisy grey-ish gradients; "
    "`mona_peft.training.segmentation.scenes`), not real images"
)


def draw_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> tuple[Image.Image, Image.Image]:
    """One (RGB image, mode-"L" mask) pair drawn with ``rng``."""
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    start, end = (random_colour(rng, rng.uniform(), rng.uniform(0, 0.25)) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    t = ((xs * math.cos(angle) + ys * math.sin(angle)) + 1.5) / 3  # in [0, 1] along a random direction
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    background = start[None, None, :] * (1 - t[..., None]) + end[None, None, :] * t[..., None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SCENE_LABELS)))
        colour = random_colour(rng, (CLASS_HUES[cls] + rng.uniform(-0.06, 0.06)) % 1.0, rng.uniform(0.45, 1.0))
        radius = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
        rotation = rng.uniform(0, 2 * math.pi)
        if cls == 1:  # disc
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            paint.ellipse(box, fill=colour)
            label.ellipse(box, fill=cls)
            continue
        corners = 4 if cls == 2 else 3
        aspect = rng.uniform(0.6, 1.0) if cls == 2 else 1.0
        points = []
        for k in range(corners):
            phi = rotation + 2 * math.pi * k / corners + (math.pi / 4 if corners == 4 else 0)
            points.append((cx + radius * math.cos(phi), cy + radius * aspect * math.sin(phi)))
        paint.polygon(points, fill=colour)
        label.polygon(points, fill=cls)
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), mask


def random_colour(rng: np.random.Generator, hue: float, saturation: float) -> tuple[int, int, int]:
    """An RGB colour (0-255) of ``hue`` and ``saturation`` (0-1) with a brightness drawn from ``rng`` in [0.35, 0.95]
    (one draw); the detection scenes paint with it too."""
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, rng.uniform(0.35, 0.95))
    return round(red * 255), round(green * 255), round(blue * 255)


def scene_dataset(num_scenes: int = DEFAULT_NUM_SCENES, seed: int = DEFAULT_SCENE_SEED, size: int = SCENE_SIZE):
    """A ``datasets.Dataset`` with ``image`` and ``label`` (mask) image columns: ``num_scenes`` scenes from ``seed``.

    Scene ``i`` depends only on ``(seed, i)``, so a smaller set is a prefix of a larger one.
    """
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    if num_scenes < 1:
        raise ValueError(f"num_scenes must be positive, got {num_scenes}")
    images, masks = [], []
    for index in range(num_scenes):
        image, mask = draw_scene(np.random.default_rng([seed, index]), size)
        images.append(image)
        masks.append(mask)
    features = Features({"image": ImageFeature(), "label": ImageFeature()})
    return Dataset.from_dict({"image": images, "label": masks}, features=features)
