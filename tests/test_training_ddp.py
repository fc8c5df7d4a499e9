"""Two processes with ``accelerate launch --num_processes 2 --cpu`` (DDP over gloo) train and save one adapter, which
reloads and reproduces what rank 0 evaluated on the test split (loss and accuracy over predictions gathered from
both processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mona_peft.training import DataArguments, load_trained, prepare_data
from training_helpers import TRAIN_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args

pytestmark = pytest.mark.slow  # two fresh Python processes importing torch + transformers: ~1 min on 2 CPU cores


def test_two_process_run_saves_one_adapter_that_reproduces_rank0(tmp_path: Path) -> None:
    model = make_tiny_checkpoint(tmp_path / "model", "dinov2")
    images = make_image_folder(tmp_path / "images", per_class=16)
    out = tmp_path / "run"
    launch = [
        "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(TRAIN_SCRIPT), *tiny_train_args(model, images, out, "--max_steps", "3"),
    ]  # fmt: skip
    result = run_script(launch, timeout=600, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Held-out test accuracy:") == 1  # printed by the main process only

    files = sorted(p.name for p in out.glob("adapter_model*"))
    assert files == ["adapter_model.safetensors"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    reported = json.loads((out / "test_results.json").read_text())
    data = prepare_data(DataArguments(train_dir=str(images), image_size=32))
    test = data.splits["test"]
    assert reported["test_samples_per_second"] > 0 and len(test) == 7  # odd: one process gets a padded batch
    logits = load_trained(out).logits([row[data.image_column] for row in test])
    labels = torch.tensor(test[data.label_column])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    assert loss == pytest.approx(reported["test_loss"], rel=1e-4, abs=1e-5)
    assert accuracy == pytest.approx(reported["test_accuracy"])
    if "| processes | 2 |" not in (out / "README.md").read_text():
        # Known open bug (issue 3): in a 2-process run the saved model card sometimes lacks the hyper-parameter table
        # (another writer replaces README.md after the main process wrote it). Everything above must still hold.
        pytest.xfail("model card lost its Training table in the 2-process run")
