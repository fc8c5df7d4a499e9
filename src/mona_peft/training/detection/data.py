"""Object-detection data: images with their objects (COCO ``[x, y, width, height]`` boxes in pixels and class ids)
from a Hub dataset in the format of transformers' object-detection example (``cppe-5``: ``image`` + ``objects`` with
``bbox`` and ``category``), a local COCO folder (images + ``annotations.json``) or the generated scenes; checks;
box-aware transforms.

Bad input is never trained on silently. Errors: a COCO file whose images are missing, whose annotations name unknown
images or category ids, or whose stated image sizes differ from the files; class ids outside the label map. Counted
skips (the counts are printed and kept in :attr:`DetectionData.skipped`): undecodable images (an error with
``--skip_undecodable_images False``), boxes partly outside their image (clipped), boxes with no area inside it,
and images left without any box (dropped).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image as PILImage

from .. import data as shared
from ..data import DataError, Preprocessing, TaskData

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

ANNOTATIONS_FILE = "annotations.json"
OBJECT_COLUMNS = ("objects",)


def OBJECT_FEATURES():  # noqa: N802 - a constant that needs `datasets`, built on use
    """The ``datasets`` features of a canonical detection split: an image and its objects."""
    from datasets import Features, Image, Sequence, Value

    objects = {"bbox": Sequence(Sequence(Value("float32"))), "category": Sequence(Value("int64"))}
    return Features({"image": Image(), "objects": objects})


@dataclass
class DetectionData(TaskData):
    """Splits of images and their ``objects`` (``{"bbox": [[x, y, w, h], ...], "category": [...]}``, pixels of the
    original image), the class names, and what was skipped per split (``{split: {reason: count}}``)."""

    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    image_size: int = 112
    """Side of the model input, at which the boxes are scored."""


def coco_folder(directory: str | Path) -> tuple[Dataset, list[str]]:
    """A COCO-format folder (``annotations.json`` + the images it names, beside it or under ``images/``) as a
    dataset with ``image`` and ``objects`` columns, and the class names (categories ordered by id; class index =
    position). Raises :class:`DataError` if the file does not match its images or names unknown categories."""
    from datasets import Dataset

    directory = Path(directory)
    path = directory / ANNOTATIONS_FILE
    if not path.is_file():
        raise DataError(f"{directory} has no {ANNOTATIONS_FILE} (a COCO detection file).")
    try:
        coco = json.loads(path.read_text())
        images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a COCO detection file with images, annotations and categories: {exc}") from exc
    categories = sorted(categories, key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    names = [str(c.get("name", c["id"])) for c in categories]
    files: dict[Any, Path] = {}
    missing = []
    for image in images:
        candidates = [directory / image["file_name"], directory / "images" / image["file_name"]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(image["file_name"])
        files[image["id"]] = found
    if missing:
        raise DataError(
            f"{path} does not match its images: {len(missing)} of {len(images)} files are missing, e.g. {missing[:3]}."
        )
    objects: dict[Any, dict[str, list]] = {i: {"bbox": [], "category": []} for i in files}
    for annotation in annotations:
        if annotation["image_id"] not in objects:
            raise DataError(
                f"{path}: annotation {annotation.get('id')} names image_id {annotation['image_id']}, "
                "which is not in its images list."
            )
        if annotation["category_id"] not in index:
            raise DataError(
                f"{path}: annotation {annotation.get('id')} has category_id {annotation['category_id']}, which is not "
                f"among the categories {sorted(index)}."
            )
        objects[annotation["image_id"]]["bbox"].append([float(v) for v in annotation["bbox"]])
        objects[annotation["image_id"]]["category"].append(index[annotation["category_id"]])
    sizes = {i["id"]: (i.get("width"), i.get("height")) for i in images}
    dataset = Dataset.from_dict(
        {
            "image": [str(files[i]) for i in files],
            "objects": [objects[i] for i in files],
            "size": [list(sizes[i]) if None not in sizes[i] else [] for i in files],
        }
    )
    from datasets import Image

    return dataset.cast_column("image", Image()), names


def _category_names(dataset: Dataset, column: str) -> list[str] | None:
    """The class names of a Hub dataset's ``objects.category`` ClassLabel (datasets 3 and 4 layouts)."""
    from datasets import ClassLabel

    feature = dataset.features[column]
    feature = getattr(feature, "feature", feature)  # Sequence/List of a dict
    if isinstance(feature, list):
        feature = feature[0]
    category = feature.get("category") if isinstance(feature, dict) else None
    category = getattr(category, "feature", category)
    return list(category.names) if isinstance(category, ClassLabel) else None


def _object_lists(value: Any) -> tuple[list, list]:
    """``(boxes, categories)`` of one row's objects: a dict of lists or a list of dicts."""
    if isinstance(value, dict):
        return list(value.get("bbox") or []), list(value.get("category") or [])
    return [o["bbox"] for o in value or []], [o["category"] for o in value or []]


def sanitise(
    dataset: Dataset, split: str, image_column: str, objects_column: str, num_labels: int | None
) -> tuple[Dataset, Counter]:
    """The split in the canonical layout (``image``, ``objects``) with boxes checked against their image: a box
    partly outside is clipped, one with no area inside is dropped, an image left without boxes is dropped (all
    counted); a class id outside ``[0, num_labels)`` or an image of another size than its COCO entry is an error."""
    counts: Counter = Counter()
    keep: list[int] = []
    rows: list[dict[str, list]] = []
    has_size = "size" in dataset.column_names
    for i in range(len(dataset)):
        row = dataset[i]
        width, height = row[image_column].size
        if has_size and row["size"] and tuple(row["size"]) != (width, height):
            raise DataError(
                f"The {split} image {i} is {width}x{height} pixels but its COCO entry says "
                f"{row['size'][0]}x{row['size'][1]}: the annotations do not match the images."
            )
        boxes, categories = _object_lists(row[objects_column])
        kept_boxes, kept_categories = [], []
        for box, category in zip(boxes, categories, strict=True):
            if num_labels is not None and not 0 <= int(category) < num_labels:
                raise DataError(
                    f"The {split} image {i} has an object of class {category}, outside the label map "
                    f"[0, {num_labels})."
                )
            if len(box) != 4:
                raise DataError(f"The {split} image {i} has a box {box} that is not [x, y, width, height].")
            x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            if cx1 - cx0 < 1 or cy1 - cy0 < 1:
                counts["boxes without area inside their image (dropped)"] += 1
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                counts["boxes partly outside their image (clipped)"] += 1
            kept_boxes.append([cx0, cy0, cx1 - cx0, cy1 - cy0])
            kept_categories.append(int(category))
        if not kept_boxes:
            counts["images without any box (dropped)"] += 1
            continue
        keep.append(i)
        rows.append({"bbox": kept_boxes, "category": kept_categories})
    if not keep:
        raise DataError(f"No {split} image with a usable box is left ({dict(counts)}).")
    from datasets import Dataset, Image

    images = dataset.select(keep).cast_column(image_column, Image(decode=False))[image_column]
    canonical = Dataset.from_dict({"image": images, "objects": rows}, features=OBJECT_FEATURES())
    return canonical, counts


def prepare_detection_data(args: Any, cache_dir: str | None = None, token: str | None = None) -> DetectionData:
    """Load, check, split and subsample the images and objects described by ``args``; see the module's docstring for
    what is an error and what is a counted skip."""
    from datasets import DatasetDict, Image

    from .scenes import SCENE_LABELS, SCENES_DESCRIPTION, scene_dataset

    folder_names: list[list[str]] = []

    def folders(directories: dict[str, str]) -> DatasetDict:
        loaded = {}
        for split, directory in directories.items():
            loaded[split], names = coco_folder(directory)
            folder_names.append(names)
        return DatasetDict(loaded)

    raw = shared.load_splits(args, lambda: scene_dataset(args.num_scenes), folders, cache_dir=cache_dir, token=token)
    splits = shared.named_splits(raw)
    image_column = shared.pick_column(splits["train"], args.image_column_name, ("image", "img"), "image", Image)
    objects_column = shared.pick_column(splits["train"], args.label_column_name, OBJECT_COLUMNS, "objects")
    if image_column is None or objects_column is None:
        raise DataError(
            f"A detection dataset needs an image column and an objects column (bbox, category); the "
            f"columns are {splits['train'].column_names}. Pass --image_column_name / --label_column_name."
        )
    if any(names != folder_names[0] for names in folder_names):
        raise DataError(f"The COCO files of the splits disagree on the categories: {folder_names}.")
    labels = shared.parse_class_names(args.class_names)
    if labels is None:
        if folder_names:
            labels = folder_names[0]
        elif args.dataset_name is None:
            labels = list(SCENE_LABELS)
        else:
            labels = _category_names(splits["train"], objects_column)
    if labels is None:
        raise DataError("The dataset's categories have no names (no ClassLabel); pass --class_names.")
    extra = ["size"] if "size" in splits["train"].column_names else []
    splits = shared.keep_columns(splits, [image_column, objects_column, *extra])
    skipped: dict[str, dict[str, int]] = {}
    for name in list(splits):
        splits[name], undecodable = shared.drop_undecodable(
            splits[name], image_column, name, skip=args.skip_undecodable_images
        )
        splits[name], counts = sanitise(splits[name], name, image_column, objects_column, len(labels))
        if undecodable:
            counts["undecodable images (dropped)"] = undecodable
        if counts:
            skipped[name] = dict(counts)
            print(f"{name}: skipped or repaired {dict(counts)}", flush=True)
    splits = shared.hold_out_and_subsample(DatasetDict(splits), args, "objects")
    description, hub = shared.data_source(args, "COCO folder", f"{args.num_scenes} {SCENES_DESCRIPTION}")
    return DetectionData(splits, "image", "objects", labels, description, hub, skipped, args.image_size)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class DetectionPreprocessing:
    """Box-aware transforms: eval resizes the image to ``image_size`` x ``image_size`` (the boxes scale with it);
    train first scales the image by a random factor in ``[min_scale, 1]`` and places it at a random position on a
    canvas of the image's size filled with the mean colour (boxes scaled and moved with it), then flips both
    horizontally with probability 0.5. Images are normalised with the checkpoint's image processor's mean and std;
    boxes become the detector's targets (``class_labels``, ``boxes`` as centre x/y, width, height relative to the
    input), and the metric is computed on them in input pixels."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_scale: float = 0.6

    def example(self, image: Any, objects: Any, rng: random.Random | None = None) -> dict[str, Any]:
        image = image.convert("RGB")
        boxes = np.asarray(_object_lists(objects)[0], dtype=np.float64).reshape(-1, 4)
        categories = np.asarray(_object_lists(objects)[1], dtype=np.int64)
        width, height = image.size
        if rng is not None:
            scale = rng.uniform(self.min_scale, 1.0)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            left, top = rng.randint(0, width - new_w), rng.randint(0, height - new_h)
            canvas = PILImage.new("RGB", (width, height), tuple(round(255 * m) for m in self.mean))
            canvas.paste(image.resize((new_w, new_h), PILImage.Resampling.BILINEAR), (left, top))
            image = canvas
            boxes = boxes * [new_w / width, new_h / height, new_w / width, new_h / height] + [left, top, 0, 0]
            if rng.random() < 0.5:
                image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
                boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
        image = image.resize((self.image_size, self.image_size), PILImage.Resampling.BILINEAR)
        relative = boxes / [width, height, width, height]
        centre = np.concatenate([relative[:, :2] + relative[:, 2:] / 2, relative[:, 2:]], axis=1)
        pixels = Preprocessing(self.image_size, self.image_size, False, self.mean, self.std).to_tensor(image)
        return {
            "pixel_values": pixels,
            "labels": {
                "class_labels": torch.as_tensor(categories, dtype=torch.long),
                "boxes": torch.as_tensor(np.clip(centre, 0, 1), dtype=torch.float32),
            },
        }


def collate_detection(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; keep one target dict per image (DETR-family losses take a list)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": [e["labels"] for e in examples],
    }
