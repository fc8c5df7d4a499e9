"""Fine-tuning image classifiers with Mona (or LoRA, full fine-tuning, a linear probe) on transformers' Trainer.

The logic behind ``scripts/train.py``, ``scripts/predict.py`` and ``notebooks/finetune_mona.ipynb``:

- :mod:`.arguments`: the command-line argument groups and the recipe defaults;
- :mod:`.data`: loading, splitting, label maps, undecodable images, transforms (PIL + torch);
- :mod:`.recipe`: the model per method, weight-decay groups, the Trainer;
- :mod:`.run`: one run end to end (:func:`train`, :func:`main`);
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
from .data import DataError, ImageClassificationData, ImageClassificationDataset, Preprocessing, prepare_data  # noqa: E402
from .inference import TrainedClassifier, load_trained  # noqa: E402
from .recipe import ModelError, RecipeTrainer, apply_method, build_model, decay_parameter_names  # noqa: E402
from .run import OutputDirError, RunResult, main, train  # noqa: E402

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
