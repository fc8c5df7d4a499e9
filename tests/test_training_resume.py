"""An interrupted run resumed with --resume_from_checkpoint ends with the same adapter as an uninterrupted one.

What makes this hold (and what the test would catch if it broke): the Trainer restores the adapter and head through
PEFT's ``load_adapter``, the optimizer, scheduler and RNG states from the checkpoint; the shuffling is seeded per
epoch; and the augmentation of each image depends only on (seed, epoch, index), not on how many images were drawn
before the interruption. Mona's dropout (0.1) and the random crops are on, and the run crosses an epoch boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mona_peft.training import parse_args, train
from training_helpers import make_image_folder, make_tiny_checkpoint, tiny_train_args


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(TrainerCallback):
    """Stop the run abruptly after ``step`` optimizer steps, before that step is checkpointed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            raise SimulatedCrash(f"interrupted after step {self.step}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    return make_tiny_checkpoint(root / "model", "dinov2"), make_image_folder(root / "images")


def _argv(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    # 27 training images, batch 8: 4 steps per epoch, so 8 steps run two epochs; checkpoints at steps 3 and 6.
    return tiny_train_args(
        model, images, out, "--max_steps", "8", "--per_device_train_batch_size", "8", "--save_steps", "3",
        "--eval_steps", "3", "--logging_steps", "1", "--min_crop_scale", "0.3", *extra,
    )  # fmt: skip


def test_resumed_run_matches_uninterrupted_run(assets: tuple[Path, Path], tmp_path: Path) -> None:
    model, images = assets
    reference = train(*parse_args(_argv(model, images, tmp_path / "reference")))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(SimulatedCrash):
        train(*parse_args(_argv(model, images, interrupted)), callbacks=[CrashAtStep(7)])
    assert (interrupted / "checkpoint-6").is_dir() and not (interrupted / "adapter_model.safetensors").exists()

    # A plain restart into the same directory is refused; resuming from the newest checkpoint continues the run.
    with pytest.raises(ValueError, match="already holds"):
        train(*parse_args(_argv(model, images, interrupted)))
    resumed = train(*parse_args(_argv(model, images, interrupted, "--resume_from_checkpoint", "latest")))

    expected = load_file(reference.output_dir / "adapter_model.safetensors")
    actual = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    mismatched = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    assert resumed.metrics["test_loss"] == reference.metrics["test_loss"]

    # The resumed run's history continues the interrupted one's: one training-loss entry per step.
    history = json.loads((interrupted / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 9))
