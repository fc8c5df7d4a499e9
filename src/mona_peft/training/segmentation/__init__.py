"""Semantic segmentation with Mona: UperNet on a Swin backbone, fine-tuned through transformers' Trainer.

The task behind ``scripts/train_segmentation.py``; the run itself is the pipeline every task shares
(:mod:`mona_peft.training.run`):

- :mod:`.arguments`: model/data arguments and defaults (``--method {mona,lora,full}``);
- :mod:`.scenes`: the offline default data, procedurally generated scenes of shapes;
- :mod:`.data`: image + mask pairs (folders, Hub datasets, scenes), checks, joint transforms;
- :mod:`.model`: UperNet around a Swin checkpoint (or the cached random Swin), methods, reloading;
- :mod:`.task`: :data:`SEGMENTATION`, the task (metric, card, saved files), :func:`train_segmentation`, :func:`main`.
"""

from .arguments import (
    SEGMENTATION_METHODS,
    SegmentationDataArguments,
    SegmentationModelArguments,
    parse_segmentation_args,
)
from .data import (
    SegmentationData,
    SegmentationPreprocessing,
    pair_folder,
    prepare_segmentation_data,
)
from .model import (
    ensure_random_swin,
    load_segmenter,
    load_trained_segmenter,
    segmentation_head_names,
)
from .scenes import SCENE_LABELS, draw_scene, scene_dataset
from .task import SEGMENTATION, SegmentationTask, main, train_segmentation

__all__ = [
    "SCENE_LABELS",
    "SEGMENTATION",
    "SEGMENTATION_METHODS",
    "SegmentationData",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "SegmentationPreprocessing",
    "SegmentationTask",
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
