"""Semantic segmentation with Mona: UperNet on a Swin backbone, fine-tuned through transformers' Trainer.

The logic behind ``scripts/train_segmentation.py``, sharing the classification recipe's conventions:

- :mod:`.arguments`: model/data arguments and defaults (``--method {mona,lora,full}``);
- :mod:`.scenes`: the offline default data, procedurally generated scenes of shapes;
- :mod:`.data`: image + mask pairs (folders, Hub datasets, scenes), checks, joint transforms;
- :mod:`.model`: UperNet around a Swin checkpoint (or the cached random Swin), methods, reloading;
- :mod:`.run`: one run end to end (:func:`train_segmentation`, :func:`main`).
"""

from .arguments import (
    SEGMENTATION_METHODS,
    SegmentationDataArguments,
    SegmentationModelArguments,
    parse_segmentation_args,
)
from .data import (
    SegmentationData,
    SegmentationDataset,
    SegmentationPreprocessing,
    pair_folder,
    prepare_segmentation_data,
)
from .model import (
    apply_segmentation_method,
    build_segmenter,
    ensure_random_swin,
    load_segmenter,
    load_trained_segmenter,
    segmentation_head_names,
)
from .run import SegmentationRunResult, main, train_segmentation
from .scenes import SCENE_LABELS, draw_scene, scene_dataset

__all__ = [
    "SCENE_LABELS",
    "SEGMENTATION_METHODS",
    "SegmentationData",
    "SegmentationDataArguments",
    "SegmentationDataset",
    "SegmentationModelArguments",
    "SegmentationPreprocessing",
    "SegmentationRunResult",
    "apply_segmentation_method",
    "build_segmenter",
    "draw_scene",
    "ensure_random_swin",
    "load_segmenter",
    "load_trained_segmenter",
    "main",
    "pair_folder",
    "parse_segmentation_args",
    "prepare_segmentation_data",
    "scene_dataset",
    "segmentation_head_names",
    "train_segmentation",
]
