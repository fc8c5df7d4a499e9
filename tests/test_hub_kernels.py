"""The training and loading pipelines load models without transformers' hub kernels unless the user asks for them
(``USE_HUB_KERNELS``): transformers 5.25 applies them by default when the ``kernels`` package is installed, and on a
GPU with the Hub offline that fails before training starts (see ``mona_peft.training.hub_kernels``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoModelForImageClassification

from mona_peft.training import load_trained, main
from training_helpers import make_image_folder, make_tiny_checkpoint, tiny_train_args


def _uses_kernels(model: object) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "use_kernels", False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-kernels")
    model_dir = make_tiny_checkpoint(root / "model", "dinov2")
    if not _uses_kernels(AutoModelForImageClassification.from_pretrained(model_dir, num_labels=3)):
        pytest.skip("this transformers does not apply hub kernels by default (transformers < 5.25 or no `kernels`)")
    return {"model": model_dir, "images": make_image_folder(root / "images", per_class=4)}


def test_training_and_loading_leave_hub_kernels_off(tiny: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    result = main(tiny_train_args(tiny["model"], tiny["images"], tmp_path / "run", "--max_steps", "1"))
    assert not _uses_kernels(result.trainer.model)
    assert not _uses_kernels(load_trained(tmp_path / "run", device="cpu").model)
    assert "USE_HUB_KERNELS" not in os.environ  # restored once the pipeline is done


def test_users_choice_of_hub_kernels_is_kept(tiny: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    result = main(tiny_train_args(tiny["model"], tiny["images"], tmp_path / "run", "--max_steps", "1"))
    assert _uses_kernels(result.trainer.model)
    assert os.environ["USE_HUB_KERNELS"] == "1"
