"""Object detection with Mona: a DETR-family detector on a DINOv2 or Swin backbone, fine-tuned through transformers'
Trainer. The task behind ``scripts/train_detection.py``; the run itself is the pipeline every task shares
(:mod:`mona_peft.training.run`):

- :mod:`.arguments`: model/data arguments and defaults (``--method {mona,lora,full}``);
- :mod:`.scenes`: the offline default data, generated scenes of shapes with exact boxes;
- :mod:`.data`: images + objects (Hub datasets, COCO folders, scenes), checks, box-aware transforms;
- :mod:`.model`: the detector around a backbone checkpoint, reloading a trained one;
- :mod:`.task`: :data:`DETECTION`, the task (COCO mAP, card, saved files), :func:`train_detection`, :func:`main`;
- :mod:`.inference`: predicting with a trained detector (:class:`TrainedDetector`, loaded by
  :func:`mona_peft.training.load_trained`), :func:`draw_detections`.
"""

from .arguments import DetectionDataArguments, DetectionModelArguments, parse_detection_args
from .data import DetectionData, DetectionPreprocessing, coco_folder, prepare_detection_data
from .inference import Detection, TrainedDetector, draw_detections
from .model import load_detector, load_trained_detector
from .scenes import SCENE_LABELS, draw_scene, scene_dataset
from .task import DETECTION, DetectionTask, main, train_detection

__all__ = [
    "DETECTION",
    "SCENE_LABELS",
    "Detection",
    "DetectionData",
    "DetectionDataArguments",
    "DetectionModelArguments",
    "DetectionPreprocessing",
    "DetectionTask",
    "TrainedDetector",
    "coco_folder",
    "draw_detections",
    "draw_scene",
    "load_detector",
    "load_trained_detector",
    "main",
    "parse_detection_args",
    "prepare_detection_data",
    "scene_dataset",
    "train_detection",
]
