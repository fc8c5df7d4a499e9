"""Fine-tuning image classifiers with Mona (or LoRA, full fine-tuning, a linear probe) on transformers' Trainer.

The logic behind ``scripts/train.py``, ``scripts/predict.py`` and ``notebooks/finetune_mona.ipynb``:

- :mod:`.run`: one run end to end for every task (:func:`train`, :func:`main`): data, model, Trainer, evaluation,
  resume, results, card and curves;
- :mod:`.task`: :class:`Task`, what a task supplies to the run (columns, transforms, model, collator, metric, card);
  :mod:`.classification` (:data:`CLASSIFICATION`, the default) and :mod:`.segmentation` are the tasks;
- :mod:`.arguments`: the command-line argument groups and the recipe defaults;
- :mod:`.data`: loading, splitting, the epoch-seeded dataset, the collator; classification's label maps,
  undecodable images and transforms (PIL + torch);
- :mod:`.recipe`: the method applied to a model, weight-decay groups, the Trainer;
- :mod:`.inference`: loading a trained model and predicting (:func:`load_trained`);
- :mod:`.distributed`: FSDP2 on CPU-only machines, gathering a sharded adapter for saving;
- :mod:`.card`, :mod:`.plots`: the model card and the training curves.

Needs the ``train`` extra (``pip install "mona-peft[train]"``); the core package does not.
"""

import importlib.util

# The packages of the `train` extra (pyproject.toml) by import name; importing this package without one of them fails
# here, with the command that installs them, rather than deep inside a submodule.
TRAIN_EXTRA_MODULES = {
    "accelerate": "accelerate",
    "datasets": "datasets",
    "evaluate": "evaluate",
    "PIL": "Pillow",
    "matplotlib": "matplotlib",
}
_missing = [package for module, package in TRAIN_EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(
        f"mona_peft.training needs {', '.join(_missing)}, which {'is' if len(_missing) == 1 else 'are'} not "
        'installed: pip install "mona-peft[train]" (for mona_peft.training.segmentation: '
        'pip install "mona-peft[segmentation]"). The core package (import mona_peft) works without them.',
        name=__name__,
    )

from .arguments import METHODS, DataArguments, ModelArguments, parse_args  # noqa: E402
from .classification import CLASSIFICATION, ClassificationTask  # noqa: E402
from .data import DataError, ImageClassificationData, Preprocessing, TaskData, TaskDataset, prepare_data  # noqa: E402
from .inference import TrainedClassifier, load_trained  # noqa: E402
from .recipe import ModelError, RecipeTrainer, apply_method, build_model, decay_parameter_names  # noqa: E402
from .run import Experiment, OutputDirError, RunResult, main, train  # noqa: E402
from .task import Task  # noqa: E402

__all__ = [
    "CLASSIFICATION",
    "METHODS",
    "ClassificationTask",
    "DataArguments",
    "DataError",
    "Experiment",
    "ImageClassificationData",
    "ModelArguments",
    "ModelError",
    "OutputDirError",
    "Preprocessing",
    "RecipeTrainer",
    "RunResult",
    "Task",
    "TaskData",
    "TaskDataset",
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
