"""Data for every task (loading, splitting, subsampling, the epoch-seeded dataset, the collator) and image
classification's own: label maps, undecodable images and the transforms (PIL + torch).

:func:`load_splits`, :func:`named_splits`, :func:`keep_columns` and :func:`hold_out_and_subsample` are the steps each
task's ``prepare_data`` shares; :func:`prepare_data` turns :class:`~mona_peft.training.arguments.DataArguments` into
train/validation/test splits with a label map; :class:`Preprocessing` holds the image pipeline read from the model's
image processor; :class:`TaskDataset` serves transformed examples (of every task) whose random augmentation depends
only on ``(seed, epoch, index)``, so a run resumed from a checkpoint sees exactly the images of an uninterrupted run,
with any number of processes or data-loader workers.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image as PILImage

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from .arguments import DataArguments

SPLITS = ("train", "validation", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 224 / 256
"""Eval crops the centre ``image_size`` of an image resized to ``image_size / 0.875`` (the recipe's 256 -> 224)."""

DEFAULT_MIN_CROP_SCALE = 0.25
"""Smallest area fraction of the training crops. timm and the official recipe use 0.08; 0.25 keeps more of the small
defects of the default data in view (a choice, not tuned)."""

DEFAULT_DATA_DESCRIPTION = "textile images (simulated defects) from the PyPI package conformal-clip-data 0.1.4"


class DataError(ValueError):
    """The dataset cannot be used for image classification as given (missing columns, one class, no images...)."""


def default_data_dir() -> Path:
    """The embedded default data set: 2,000 textile images in three classes (``global``, ``local``, ``nominal``)."""
    try:
        import conformal_clip_data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError(
            "The default data set comes from the PyPI package conformal-clip-data (pip install "
            "conformal-clip-data==0.1.4); or pass --dataset_name / --train_dir."
        ) from exc
    return Path(conformal_clip_data.textile_simulated_root())


@dataclass
class TaskData:
    """Train/validation/test splits of a task, the two columns an example is read from (the image, and its label:
    a class, a mask, the objects), and the class names (index = class id)."""

    splits: DatasetDict
    image_column: str
    label_column: str
    labels: list[str]
    description: str
    hub_dataset: str | None = None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLITS)
        return f"{self.description}: {len(self.labels)} classes {self.labels}; {sizes} images"


@dataclass
class ImageClassificationData(TaskData):
    """Classification splits; ``dropped_images`` counts the undecodable images removed per split."""

    dropped_images: dict[str, int] = field(default_factory=dict)


def load_splits(
    args: Any,
    default: Callable[[], Dataset | DatasetDict],
    folders: Callable[[dict[str, str]], DatasetDict],
    cache_dir: str | None = None,
    token: str | None = None,
) -> DatasetDict:
    """The dataset as loaded for any task: ``--dataset_name`` through ``datasets.load_dataset``, else the folders
    ``--train_dir`` / ``--validation_dir`` / ``--test_dir`` through ``folders({split: directory})``, else the task's
    ``default()`` data."""
    from datasets import DatasetDict, load_dataset

    if args.dataset_name is not None:
        loaded = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=cache_dir, token=token)
    elif args.train_dir is None:
        loaded = default()
    else:
        directories = {}
        for split, directory in zip(SPLITS, (args.train_dir, args.validation_dir, args.test_dir), strict=True):
            if directory is None:
                continue
            if not Path(directory).is_dir():
                raise DataError(f"--{split}_dir {directory!r} is not a directory.")
            directories[split] = directory
        loaded = folders(directories)
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def named_splits(raw: DatasetDict) -> DatasetDict:
    """The train/validation/test splits the dataset has (``valid`` counts as validation); train is required."""
    from datasets import DatasetDict

    if "train" not in raw:
        raise DataError(f"The dataset has no 'train' split (splits: {list(raw)}).")
    splits = DatasetDict({name: raw[name] for name in SPLITS if name in raw})
    if "validation" not in splits and "valid" in raw:
        splits["validation"] = raw["valid"]
    return splits


def pick_column(
    dataset: Dataset, requested: str | None, candidates: Sequence[str], what: str, feature: type | None = None
) -> str | None:
    """The column ``requested`` (an error if missing), else the first of ``candidates`` present, else the only column
    of the ``datasets`` feature type ``feature``; ``None`` if there is none."""
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise DataError(f"The dataset has no {what} column {requested!r}; its columns are {columns}.")
        return requested
    found = next((name for name in candidates if name in columns), None)
    if found is None and feature is not None:
        typed = [name for name, value in dataset.features.items() if isinstance(value, feature)]
        found = typed[0] if len(typed) == 1 else None
    return found


def keep_columns(splits: DatasetDict, columns: Sequence[str]) -> DatasetDict:
    """Every split with exactly ``columns``; a split lacking one is an error."""
    for name, split in splits.items():
        missing = set(columns) - set(split.column_names)
        if missing:
            raise DataError(f"The {name} split lacks the column(s) {sorted(missing)} (columns: {split.column_names}).")
    return type(splits)({name: split.select_columns(list(columns)) for name, split in splits.items()})


def hold_out_and_subsample(splits: DatasetDict, args: Any, stratify_column: str) -> DatasetDict:
    """Hold the missing test and validation splits out of train (``args.split_seed``, stratified by
    ``stratify_column`` where every class is large enough) and cut each split to ``args.max_*_samples``."""
    train = splits["train"]
    if "test" not in splits:
        train, splits["test"] = _split_off(train, args.test_split_fraction, args.split_seed, stratify_column)
    if "validation" not in splits:
        fraction = args.validation_split_fraction / (1 - args.test_split_fraction)
        train, splits["validation"] = _split_off(train, fraction, args.split_seed, stratify_column)
    splits["train"] = train
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and len(splits[name]) > limit:
            splits[name] = splits[name].shuffle(seed=args.split_seed).select(range(limit))
    return type(splits)({name: splits[name] for name in SPLITS})


def load_raw_dataset(args: DataArguments, cache_dir: str | None = None, token: str | None = None) -> DatasetDict:
    """The dataset as ``datasets`` loads it: a Hub/local dataset, image folders, or the embedded default."""
    from datasets import load_dataset

    return load_splits(
        args,
        default=lambda: load_dataset("imagefolder", data_dir=str(default_data_dir()), cache_dir=cache_dir),
        folders=lambda dirs: load_dataset(
            "imagefolder", data_files={split: str(Path(d) / "**") for split, d in dirs.items()}, cache_dir=cache_dir
        ),
        cache_dir=cache_dir,
        token=token,
    )


def _find_label_column(dataset: Dataset, requested: str | None, train_dir: str | None = None) -> str:
    from datasets import ClassLabel

    found = pick_column(dataset, requested, ("label", "labels"), "label", ClassLabel)
    if found is not None:
        return found
    folders = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir()) if train_dir else []
    if len(folders) == 1:  # imagefolder drops the label of a single class folder
        raise DataError(
            f"Image classification needs at least two classes, but {train_dir} has one class folder: {folders[0]!r}."
        )
    raise DataError(
        f"The dataset has no label column 'label' (columns: {list(dataset.column_names)}). For image folders, put the "
        "images of each class in their own sub-folder (train/<class>/<image>); for other datasets pass "
        "--label_column_name."
    )


def _encode_labels(splits: DatasetDict, label_column: str) -> DatasetDict:
    """Make the label column a ``ClassLabel`` with the same names in every split."""
    from datasets import ClassLabel, concatenate_datasets

    features = {name: split.features[label_column] for name, split in splits.items()}
    if all(isinstance(f, ClassLabel) for f in features.values()):
        names = {tuple(f.names) for f in features.values()}
        if len(names) > 1:
            raise DataError(
                f"The splits disagree on the classes: {sorted(names)}. Use the same class sub-folders in every split."
            )
        return splits
    # Encode plain strings/ints jointly so that every split gets the same class ids.
    keys = list(splits)
    joined = concatenate_datasets([splits[k].select_columns([label_column]) for k in keys]).class_encode_column(
        label_column
    )
    feature = joined.features[label_column]
    assert isinstance(feature, ClassLabel)
    return type(splits)({k: splits[k].cast_column(label_column, feature) for k in keys})


def _decodes(item: dict[str, Any] | None) -> bool:
    if item is None:
        return False
    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
        if source is None:
            return False
        with PILImage.open(source) as image:
            image.load()  # a full decode: truncated and corrupt files raise here
        return True
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError):
        return False


def drop_undecodable(dataset: Dataset, image_column: str, split: str, skip: bool = True) -> tuple[Dataset, int]:
    """Remove the rows whose image PIL cannot decode, saying how many; with ``skip=False`` raise instead.

    Returns the cleaned dataset and the number of rows removed. Raises :class:`DataError` if nothing is left.
    """
    from datasets import Image

    raw = dataset.cast_column(image_column, Image(decode=False))
    flags = raw.map(
        lambda batch: {"_decodable": [_decodes(item) for item in batch[image_column]]},
        batched=True,
        batch_size=256,
        remove_columns=raw.column_names,
        desc=f"Checking {split} images",
    )["_decodable"]
    bad = [i for i, ok in enumerate(flags) if not ok]
    if not bad:
        return dataset, 0
    examples = [_describe(raw[i][image_column]) for i in bad[:5]]
    message = f"{len(bad)} of {len(dataset)} {split} images cannot be decoded, e.g. {examples}"
    if not skip:
        raise DataError(message + ". Remove or repair them, or pass --skip_undecodable_images True.")
    if len(bad) == len(dataset):
        raise DataError(message + f": no usable {split} image is left.")
    print(f"Skipping {message}.", flush=True)
    keep = np.setdiff1d(np.arange(len(dataset)), np.asarray(bad))
    return dataset.select(keep), len(bad)


def _describe(item: dict[str, Any] | None) -> str:
    if not item:
        return "<missing>"
    return str(item.get("path") or f"<{len(item.get('bytes') or b'')} bytes>")


def _split_off(dataset: Dataset, fraction: float, seed: int, label_column: str) -> tuple[Dataset, Dataset]:
    """(rest, held-out): a stratified split, or a plain random one when a class is too small to stratify."""
    count = max(1, round(len(dataset) * fraction))
    if count >= len(dataset):
        raise DataError(f"Only {len(dataset)} training images: too few to hold out {fraction:.0%} of them.")
    try:
        parts = dataset.train_test_split(test_size=count, seed=seed, stratify_by_column=label_column)
    except ValueError:
        parts = dataset.train_test_split(test_size=count, seed=seed)
    return parts["train"], parts["test"]


def prepare_data(
    args: DataArguments, cache_dir: str | None = None, token: str | None = None
) -> ImageClassificationData:
    """Load, check, split and subsample the data described by ``args``.

    Missing validation/test splits are held out from the training split (stratified, ``args.split_seed``); images
    that cannot be decoded are dropped with a printed count (or raise, see ``skip_undecodable_images``).

    Raises:
        DataError: no image or label column, fewer than two classes, splits that disagree on the classes, or a split
            left without usable images.
    """
    from datasets import Image

    splits = named_splits(load_raw_dataset(args, cache_dir=cache_dir, token=token))
    image_column = pick_column(splits["train"], args.image_column_name, ("image", "img"), "image", Image)
    if image_column is None:
        raise DataError(
            f"Cannot tell which column holds the images (columns: {splits['train'].column_names}); pass "
            "--image_column_name."
        )
    label_column = _find_label_column(splits["train"], args.label_column_name, args.train_dir)
    splits = _encode_labels(keep_columns(splits, [image_column, label_column]), label_column)
    labels = list(splits["train"].features[label_column].names)
    if len(labels) < 2:
        found = f"one: {labels[0]!r}" if labels else "none"
        raise DataError(
            f"Image classification needs at least two classes, but the dataset has {found}. For image folders, use "
            "one sub-folder per class."
        )

    dropped: dict[str, int] = {}
    for name in list(splits):
        splits[name], dropped[name] = drop_undecodable(
            splits[name], image_column, name, skip=args.skip_undecodable_images
        )
    splits = hold_out_and_subsample(splits, args, label_column)

    if args.dataset_name is not None:
        description, hub = f"dataset {args.dataset_name}", args.dataset_name
    elif args.train_dir is not None:
        description, hub = f"image folder {args.train_dir}", None
    else:
        description, hub = DEFAULT_DATA_DESCRIPTION, None
    return ImageClassificationData(
        splits, image_column, label_column, labels, description, hub, {k: v for k, v in dropped.items() if v}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class Preprocessing:
    """The image pipeline: eval = resize (+ centre crop), train = random-resized crop + horizontal flip; both then
    scale to [0, 1] and normalise with the model's mean and std.

    ``center_crop`` follows the model's image processor: processors that crop (DINOv2's, DeiT's, CLIP's) resize the
    shorter side to ``resize_size`` and crop ``image_size``; the others (ViT's) resize straight to ``image_size``.
    """

    image_size: int
    resize_size: int
    center_crop: bool
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: int = PILImage.Resampling.BICUBIC
    min_crop_scale: float = DEFAULT_MIN_CROP_SCALE

    @classmethod
    def from_processor(
        cls, processor: Any, image_size: int | None = None, min_crop_scale: float = DEFAULT_MIN_CROP_SCALE
    ) -> Preprocessing:
        """Read mean, std, interpolation and whether to centre-crop from a transformers image processor.

        ``image_size`` overrides the processor's own size (the resize side follows: ``image_size / 0.875`` when
        cropping); ``None`` keeps the processor's sizes, as saved with a fine-tuned model.
        """
        crop = bool(getattr(processor, "do_center_crop", False)) and getattr(processor, "crop_size", None) is not None
        if image_size is None:
            image_size = _side(processor.crop_size if crop else processor.size)
            resize = _side(processor.size) if crop else image_size
        else:
            resize = round(image_size / EVAL_CROP_FRACTION) if crop else image_size
        mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
        std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
        resample = getattr(processor, "resample", None)
        resample = int(resample) if resample is not None else int(PILImage.Resampling.BICUBIC)
        return cls(image_size, resize, crop, mean, std, resample, min_crop_scale)

    def update_processor(self, processor: Any) -> Any:
        """Write this pipeline's sizes into ``processor`` (to be saved with the model), and return it."""
        if self.center_crop:
            processor.size = {"shortest_edge": self.resize_size}
            processor.crop_size = {"height": self.image_size, "width": self.image_size}
        else:
            processor.size = {"height": self.image_size, "width": self.image_size}
        return processor

    def to_tensor(self, image: PILImage.Image) -> torch.Tensor:
        """[3, H, W] float tensor, scaled to [0, 1] and normalised."""
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (tensor - mean) / std

    def eval_image(self, image: PILImage.Image) -> PILImage.Image:
        """Resize (+ centre crop) to ``image_size`` x ``image_size``."""
        image = image.convert("RGB")
        if not self.center_crop:
            return image.resize((self.image_size, self.image_size), resample=self.resample)
        width, height = image.size
        scale = self.resize_size / min(width, height)
        new_w, new_h = max(self.resize_size, round(width * scale)), max(self.resize_size, round(height * scale))
        image = image.resize((new_w, new_h), resample=self.resample)
        left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def train_image(self, image: PILImage.Image, rng: random.Random) -> PILImage.Image:
        """Random-resized crop (area ``[min_crop_scale, 1]``, aspect ``[3/4, 4/3]``) then a horizontal flip with
        probability 0.5, drawing all randomness from ``rng`` (the algorithm of torchvision's RandomResizedCrop)."""
        image = image.convert("RGB")
        left, top, w, h = _random_crop_box(image.size, (self.min_crop_scale, 1.0), (3 / 4, 4 / 3), rng)
        image = image.resize(
            (self.image_size, self.image_size), resample=self.resample, box=(left, top, left + w, top + h)
        )
        if rng.random() < 0.5:
            image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        return image

    def eval_tensor(self, image: PILImage.Image) -> torch.Tensor:
        return self.to_tensor(self.eval_image(image))

    def example(self, image: PILImage.Image, label: int, rng: random.Random | None = None) -> dict[str, Any]:
        """A model input: the image transformed (augmented with ``rng``, evaluation without) and its class id."""
        image = self.eval_image(image) if rng is None else self.train_image(image, rng)
        return {"pixel_values": self.to_tensor(image), "labels": int(label)}


def _side(size: Any) -> int:
    """One side length from a processor size (dict or SizeDict with shortest_edge or height/width)."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    for key in ("shortest_edge", "height", "width"):
        value = get(key)
        if value:
            return int(value)
    if isinstance(size, int):
        return size
    raise ValueError(f"Cannot read an image size from {size!r}.")


def _random_crop_box(
    size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop within the allowed aspect ratios.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TaskDataset(torch.utils.data.Dataset):
    """A split served as the examples of a task: ``preprocessing.example(image, label, rng)`` of each row (for
    classification ``{"pixel_values": [3, S, S], "labels": int}``, for segmentation the labels are a [S, S] mask).

    With ``train=True`` each example is augmented with a random generator seeded by ``(seed, epoch, index)``
    (:meth:`rng`); evaluation examples get ``rng=None``. The augmentation of an image does not depend on what was
    loaded before it, so resuming from a checkpoint, the number of processes and the number of data-loader workers
    leave it unchanged. The trainer advances the epoch through :meth:`set_epoch` (see
    :class:`~mona_peft.training.recipe.EpochCallback`).
    """

    def __init__(
        self,
        dataset: Dataset,
        image_column: str,
        label_column: str,
        preprocessing: Any,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.preprocessing = preprocessing
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch``."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> random.Random:
        """The augmentation generator of example ``index`` in the current epoch."""
        return random.Random(f"{self.seed}/{self.epoch}/{int(index)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        rng = self.rng(index) if self.train else None
        return self.preprocessing.example(row[self.image_column], row[self.label_column], rng)


def make_collator(forward_kwargs: dict[str, Any] | None = None) -> Callable[[Sequence[dict]], dict[str, Any]]:
    """A collate function stacking examples into ``pixel_values`` and ``labels`` (class ids into a [B] tensor, masks
    into [B, S, S]) plus fixed model ``forward_kwargs`` (e.g. ``interpolate_pos_encoding=True`` for a ViT run at
    another size than its pretraining)."""
    extra = dict(forward_kwargs or {})

    def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        labels = [e["labels"] for e in examples]
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long),
        }
        batch.update(extra)
        return batch

    return collate


def load_image(path: str | Path) -> PILImage.Image:
    """Open an image file fully decoded, or raise :class:`DataError` saying which file is unreadable."""
    try:
        with PILImage.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as exc:
        raise DataError(f"Cannot read the image {str(path)!r}: {exc}") from exc


def parse_class_names(value: str | None) -> list[str] | None:
    """``--class_names``: comma-separated names, or a JSON file with a list of names or an ``id2label`` dict."""
    if value is None:
        return None
    if value.endswith(".json"):
        loaded = json.loads(Path(value).read_text())
        if isinstance(loaded, dict):
            loaded = loaded.get("id2label", loaded)
            ids = sorted(int(k) for k in loaded)
            if ids != list(range(len(ids))):
                raise DataError(f"{value}: the class ids must be 0..N-1, got {ids[:10]}.")
            return [str(loaded[str(i)] if str(i) in loaded else loaded[i]) for i in ids]
        return [str(name) for name in loaded]
    names = [name.strip() for name in value.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"--class_names has duplicates: {names}.")
    return names


def data_source(args: Any, folder_kind: str, default: str) -> tuple[str, str | None]:
    """(description, Hub dataset id or None) of what ``args`` loads: ``--dataset_name``, else a ``--train_dir`` folder
    of ``folder_kind``, else the task's ``default`` data."""
    if args.dataset_name is not None:
        return f"dataset {args.dataset_name}", args.dataset_name
    if args.train_dir is not None:
        return f"{folder_kind} {args.train_dir}", None
    return default, None
