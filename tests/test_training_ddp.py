"""Two CPU processes (DDP over gloo) train and save one adapter, which reloads and reproduces what rank 0 evaluated on
the test split (loss and accuracy over predictions gathered from both processes).

The launcher is ``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath); on a machine without an
accelerator the script makes the processes a CPU group. ``accelerate launch --cpu --num_processes 2`` is not used: with
accelerate 1.x it starts a single process unless MPI is set up (``--mpirun_hostfile``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mona_peft.training import DataArguments, load_trained, prepare_data
from training_helpers import TRAIN_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args


def test_two_process_run_saves_one_adapter_that_reproduces_rank0(tmp_path: Path) -> None:
    model = make_tiny_checkpoint(tmp_path / "model", "dinov2")
    images = make_image_folder(tmp_path / "images", per_class=16)
    out = tmp_path / "run"
    launch = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
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
    assert len(test) == 7  # odd: the second process pads its last batch, which gathering must drop again
    with (out / "test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["index"]) for row in rows] == list(range(7))
    evaluated = torch.tensor([[float(row[f"logit_{label}"]) for label in data.labels] for row in rows])

    reloaded = load_trained(out).logits([row[data.image_column] for row in test])
    torch.testing.assert_close(reloaded, evaluated, rtol=1e-4, atol=1e-5)
    labels = torch.tensor(test[data.label_column])
    assert (reloaded.argmax(-1) == labels).float().mean().item() == pytest.approx(reported["test_accuracy"])
    assert "| processes | 2 |" in (out / "README.md").read_text()  # two processes really trained together


def _leave_group(rank: int, world_size: int, port: int, out: str) -> None:
    """One launched process: join a gloo group as a launcher would set it up, then end it as the scripts do."""
    import os

    import torch.distributed as dist

    from mona_peft.training.distributed import end_process_group

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    dist.barrier()
    ended = end_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"ended": ended, "initialized": dist.is_initialized()}))


def test_launched_processes_end_their_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of two launched processes destroys its default group before exiting; a process that was not launched as
    one of several keeps a group it set up itself."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from mona_peft.training.distributed import end_process_group

    mp.spawn(_leave_group, args=(2, 29533, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"ended": True, "initialized": False}

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert end_process_group() is False and dist.is_initialized()
    finally:
        dist.destroy_process_group()
