"""Semantic-segmentation data: image + mask pairs from folders, a Hub dataset or the generated scenes; checks;
joint transforms of image and mask.

Masks are single-channel images (or 2-D integer arrays) whose value at each pixel is a class index; ``ignore_index``
(default 255) marks pixels that count neither in the loss nor in the metric. With ``reduce_labels`` (the ADE20K
convention) 0 means "other" and becomes ``ignore_index``, and every other class moves down by one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image as PILImage

from ..data import (
    SPLITS,
    DataError,
    Preprocessing,
    TaskData,
    _random_crop_box,
    data_source,
    hold_out_and_subsample,
    keep_columns,
    load_splits,
    named_splits,
    parse_class_names,
    pick_column,
)
from .scenes import DEFAULT_NUM_SCENES, SCENE_LABELS, SCENES_DESCRIPTION, scene_dataset

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from .arguments import SegmentationDataArguments

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_COLUMNS = ("image", "pixel_values", "img")
MASK_COLUMNS = ("label", "annotation", "semantic_map", "mask", "segmentation_mask", "gtFine")


@dataclass
class SegmentationData(TaskData):
    """Train/validation/test splits of (image, mask) pairs (``label_column`` holds the masks) and the class names
    (index = mask value after ``reduce_labels``)."""

    ignore_index: int = 255
    reduce_labels: bool = False


def pair_folder(directory: str | Path) -> Dataset:
    """A dataset of the pairs ``<directory>/images/<name>.<ext>`` + ``<directory>/masks/<name>.png`` (same stem).

    Raises :class:`DataError` if a sub-folder is missing, an image has no mask (or a mask no image), or there is no
    pair at all.
    """
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    root = Path(directory)
    folders = {name: root / name for name in ("images", "masks")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DataError(
                f"{root} has no '{name}' sub-folder. A segmentation folder holds images/<name>.<ext> and "
                "masks/<name>.png (same file name stem, masks single-channel with one class index per pixel)."
            )
    images = {p.stem: p for p in sorted(folders["images"].iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    masks = {p.stem: p for p in sorted(folders["masks"].iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        raise DataError(
            f"Images and masks in {root} do not pair up by file name: images without a mask {lonely_images[:5]}, "
            f"masks without an image {lonely_masks[:5]}."
        )
    if not images:
        raise DataError(f"{root}/images holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    stems = sorted(images)
    features = Features({"image": ImageFeature(), "label": ImageFeature()})
    return Dataset.from_dict(
        {"image": [str(images[s]) for s in stems], "label": [str(masks[s]) for s in stems]}, features=features
    )


def load_raw_segmentation(
    args: SegmentationDataArguments, cache_dir: str | None = None, token: str | None = None
) -> DatasetDict:
    """The pairs as loaded: a Hub/local dataset, pair folders, or the generated scenes."""
    from datasets import DatasetDict

    return load_splits(
        args,
        default=lambda: scene_dataset(args.num_scenes),
        folders=lambda dirs: DatasetDict({split: pair_folder(d) for split, d in dirs.items()}),
        cache_dir=cache_dir,
        token=token,
    )


def _pick_column(dataset: Dataset, requested: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    found = pick_column(dataset, requested, candidates, what)
    if found is None:
        raise DataError(
            f"Cannot find the {what} column (looked for {list(candidates)}; the columns are "
            f"{list(dataset.column_names)}). Pass {flag}."
        )
    return found


def mask_array(mask: Any, where: str) -> np.ndarray:
    """A mask as a 2-D integer array; a colour (RGB) mask is an error, since its values are not class indices."""
    if isinstance(mask, PILImage.Image):
        if mask.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            raise DataError(
                f"The mask of {where} is a colour ({mask.mode}) image; masks must be single-channel with one class "
                "index per pixel (PNG mode L, P or I). Convert colour-coded masks to class indices first."
            )
        array = np.asarray(mask)
    else:
        array = np.asarray(mask)
    if array.ndim != 2:
        raise DataError(f"The mask of {where} has shape {array.shape}; expected a 2-D map of class indices.")
    integral = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    if not integral and not np.all(np.equal(np.mod(array, 1), 0)):
        raise DataError(f"The mask of {where} holds non-integer values; masks hold class indices.")
    return array.astype(np.int64)


def reduce_mask(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """The ADE20K convention: 0 ("other") becomes ``ignore_index``, every other class moves down by one."""
    reduced = np.where(mask == 0, ignore_index, mask - 1)
    return np.where(mask == ignore_index, ignore_index, reduced)


def _image_size(item: Any) -> tuple[int, int]:
    if isinstance(item, PILImage.Image):
        return item.size
    array = np.asarray(item)
    return (array.shape[1], array.shape[0])


def _describe(split: str, index: int, dataset: Dataset, column: str) -> str:
    from datasets import Image as ImageFeature

    name = f"{split} example {index}"
    if isinstance(dataset.features[column], ImageFeature):
        raw = dataset.cast_column(column, ImageFeature(decode=False))[index][column]
        if raw and raw.get("path"):
            name += f" ({raw['path']})"
    return name


def check_pairs(
    dataset: Dataset,
    split: str,
    image_column: str,
    mask_column: str,
    num_labels: int | None,
    ignore_index: int,
    reduce_labels: bool,
) -> int:
    """Check every pair of a split: the mask is a 2-D class map of the image's size, and (with ``num_labels``) every
    value is a class index or ``ignore_index``. Returns the largest class index seen (-1 if none).

    Raises :class:`DataError` naming the first offending example.
    """
    largest = -1
    for index in range(len(dataset)):
        try:
            row = dataset[index]
        except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as exc:
            raise DataError(
                f"Cannot decode the image or mask of {_describe(split, index, dataset, image_column)}: {exc}"
            ) from exc
        where = f"{split} example {index}"
        mask = mask_array(row[mask_column], where)
        width, height = _image_size(row[image_column])
        if mask.shape != (height, width):
            raise DataError(
                f"The mask of {_describe(split, index, dataset, mask_column)} is {mask.shape[1]}x{mask.shape[0]} "
                f"pixels but its image is {width}x{height}; each mask must have its image's size."
            )
        if reduce_labels:
            mask = reduce_mask(mask, ignore_index)
        values = np.unique(mask)
        values = values[values != ignore_index]
        if values.size and values.min() < 0:
            raise DataError(f"The mask of {_describe(split, index, dataset, mask_column)} has negative values.")
        if values.size and num_labels is not None and values.max() >= num_labels:
            bad = [int(v) for v in values if v >= num_labels]
            raise DataError(
                f"The mask of {_describe(split, index, dataset, mask_column)} has class value(s) {bad[:5]} outside "
                f"0..{num_labels - 1} ({num_labels} classes from --class_names) that are not --ignore_index "
                f"{ignore_index}. Give every class a name in --class_names, or mark such pixels with --ignore_index."
            )
        if values.size:
            largest = max(largest, int(values.max()))
    return largest


def prepare_segmentation_data(
    args: SegmentationDataArguments, cache_dir: str | None = None, token: str | None = None
) -> SegmentationData:
    """Load, split, subsample and check the pairs described by ``args``.

    Missing validation/test splits are held out from the training split (random, ``args.split_seed``). The class
    names come from ``--class_names``, or are the generated scenes' names, or else ``"0" .. "N-1"`` with N one more
    than the largest class index found in the masks.

    Raises:
        DataError: no image or mask column, a mask that is not a class map of its image's size, class values beyond
            ``--class_names``, or fewer than two classes.
    """
    splits = named_splits(load_raw_segmentation(args, cache_dir=cache_dir, token=token))
    image_column = _pick_column(splits["train"], args.image_column_name, IMAGE_COLUMNS, "image", "--image_column_name")
    mask_candidates = [c for c in MASK_COLUMNS if c != image_column]
    mask_column = _pick_column(
        splits["train"], args.label_column_name, mask_candidates, "mask (label)", "--label_column_name"
    )
    splits = hold_out_and_subsample(keep_columns(splits, [image_column, mask_column]), args, mask_column)

    default_scenes = args.dataset_name is None and args.train_dir is None
    labels = parse_class_names(args.class_names)
    if labels is None and default_scenes:
        labels = list(SCENE_LABELS)
    largest = -1
    for name in SPLITS:
        seen = check_pairs(
            splits[name],
            name,
            image_column,
            mask_column,
            None if labels is None else len(labels),
            args.ignore_index,
            args.reduce_labels,
        )
        largest = max(largest, seen)
    if labels is None:
        labels = [str(i) for i in range(largest + 1)]
    if len(labels) < 2:
        raise DataError(
            f"Semantic segmentation needs at least two classes, but the masks hold {len(labels)} "
            f"(largest class index {largest}, --ignore_index {args.ignore_index}). Check --reduce_labels and "
            "--ignore_index, or name the classes with --class_names."
        )

    description, hub = data_source(args, "image/mask folder", f"{args.num_scenes} {SCENES_DESCRIPTION}")
    return SegmentationData(
        splits, image_column, mask_column, labels, description, hub, args.ignore_index, args.reduce_labels
    )


# ---------------------------------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class SegmentationPreprocessing:
    """Joint transforms of image and mask: eval resizes both to ``image_size`` x ``image_size`` (image bilinear,
    mask nearest); train takes a random crop (area ``[min_crop_scale, 1]``, aspect 3/4-4/3) of both, resizes it the
    same way and flips both horizontally with probability 0.5. Images are then normalised with ``mean``/``std``.

    Metrics are computed on the resized masks, i.e. at the model's input resolution.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_crop_scale: float = 0.5
    ignore_index: int = 255
    reduce_labels: bool = False

    @property
    def _normalise(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.image_size, False, self.mean, self.std)

    def to_tensors(self, image: PILImage.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise.to_tensor(image), torch.from_numpy(np.array(mask, dtype=np.int64))

    def _labels(self, mask: Any) -> PILImage.Image:
        array = mask_array(mask, "an example")
        if self.reduce_labels:
            array = reduce_mask(array, self.ignore_index)
        return PILImage.fromarray(array.astype(np.int32), mode="I")

    def eval_pair(self, image: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        size = (self.image_size, self.image_size)
        image = _as_rgb(image).resize(size, resample=PILImage.Resampling.BILINEAR)
        labels = self._labels(mask).resize(size, resample=PILImage.Resampling.NEAREST)
        return self.to_tensors(image, np.asarray(labels))

    def example(self, image: Any, mask: Any, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        """A model input: ``pixel_values`` [3, S, S] and ``labels`` [S, S], augmented with ``rng`` (evaluation
        without)."""
        pixels, labels = self.eval_pair(image, mask) if rng is None else self.train_pair(image, mask, rng)
        return {"pixel_values": pixels, "labels": labels}

    def train_pair(self, image: Any, mask: Any, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        image = _as_rgb(image)
        labels = self._labels(mask)
        left, top, w, h = _random_crop_box(image.size, (self.min_crop_scale, 1.0), (3 / 4, 4 / 3), rng)
        box = (left, top, left + w, top + h)
        size = (self.image_size, self.image_size)
        image = image.resize(size, resample=PILImage.Resampling.BILINEAR, box=box)
        labels = labels.resize(size, resample=PILImage.Resampling.NEAREST, box=box)
        if rng.random() < 0.5:
            image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
            labels = labels.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensors(image, np.asarray(labels))


def _as_rgb(image: Any) -> PILImage.Image:
    if not isinstance(image, PILImage.Image):
        image = PILImage.fromarray(np.asarray(image).astype(np.uint8))
    return image.convert("RGB")


__all__ = [
    "DEFAULT_NUM_SCENES",
    "SegmentationData",
    "SegmentationPreprocessing",
    "check_pairs",
    "pair_folder",
    "prepare_segmentation_data",
]
