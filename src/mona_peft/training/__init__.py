"""Fine-tuning image classifiers with Mona (or LoRA, full fine-tuning, a linear probe) on transformers' Trainer.

The logic behind ``scripts/train.py``, ``scripts/predict.py`` and ``notebooks/finetune_mona.ipynb``:

- :mod:`.arguments`: the command-line argument groups and the recipe defaults;
- :mod:`.data`: loading, splitting, label maps, undecodable images, transforms (PIL + torch);
- :mod:`.recipe`: the model per method, weight-decay groups, the Trainer;
- :mod:`.run`: one run end to end (:func:`train`, :func:`main`);
- :mod:`.inference`: loading a trained model and predicting (:func:`load_trained`);
- :mod:`.distributed`: FSDP2 on CPU-only machines, gathering a sharded adapter for saving;
- :mod:`.card`, :mod:`.plots`: the model card and the training curves.
"""

from .arguments import METHODS, DataArguments, ModelArguments, parse_args
from .data import DataError, ImageClassificationData, ImageClassificationDataset, Preprocessing, prepare_data
from .inference import TrainedClassifier, load_trained
from .recipe import ModelError, RecipeTrainer, apply_method, build_model, decay_parameter_names
from .run import OutputDirError, RunResult, main, train

__all__ = [
    "METHODS",
    "DataArguments",
    "DataError",
    "ImageClassificationData",
    "ImageClassificationDataset",
    "ModelArguments",
    "ModelError",
    "OutputDirError",
    "Preprocessing",
    "RecipeTrainer",
    "RunResult",
    "TrainedClassifier",
    "apply_method",
    "build_model",
    "decay_parameter_names",
    "load_trained",
    "main",
    "parse_args",
    "prepare_data",
    "train",
]
