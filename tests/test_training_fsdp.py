"""Two CPU processes train with FSDP2 (accelerate's ``fsdp_version: 2``, gloo) and save ONE full adapter, which loads
with ``PeftModel.from_pretrained`` onto a fresh base model and reproduces what rank 0 evaluated on the test split.

The launch uses the committed accelerate config ``scripts/accelerate/fsdp2_cpu.yaml`` (``distributed_type: FSDP``,
2 processes, one FSDP unit per ``MonaLayer``). accelerate alone would fall back to DDP on a machine without an
accelerator; the script turns FSDP on for the CPU group (``mona_peft.training.distributed``). Both state-dict types
are run (with ``SHARDED_STATE_DICT``, FSDP2's default, the Trainer by itself would save no model at all), and both ways
of loading the weights (``fsdp_cpu_ram_efficient_loading`` on and off).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageClassification

from mona_peft import MonaConfig
from mona_peft.training import DataArguments, TrainedClassifier, load_trained, prepare_data
from training_helpers import REPO, TRAIN_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args

FSDP2_CPU_CONFIG = REPO / "scripts" / "accelerate" / "fsdp2_cpu.yaml"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "fsdp_checkpoint"),
    [
        # the committed config as it is: full-state-dict checkpoints; only the main process reads the checkpoint, the
        # other starts on the meta device and gets the main process' weights (Mona's and the head's too) by broadcast
        ((), "pytorch_model_fsdp.bin"),
        # FSDP2's default state-dict type (the Trainer alone would save no model), every process reading the weights
        (("--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "false"),
         "pytorch_model_fsdp_0"),
    ],
    ids=["config", "sharded-no-ram-efficient-loading"],
)  # fmt: skip
def test_fsdp2_two_cpu_processes_save_one_adapter_that_reproduces_rank0(
    tmp_path: Path, overrides: tuple[str, ...], fsdp_checkpoint: str
) -> None:
    model_dir = make_tiny_checkpoint(tmp_path / "model", "dinov2")
    images = make_image_folder(tmp_path / "images", per_class=16)
    out = tmp_path / "run"
    launch = [
        "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CPU_CONFIG), *overrides,
        "--main_process_port", "29521" if not overrides else "29522",
        str(TRAIN_SCRIPT), *tiny_train_args(model_dir, images, out, "--max_steps", "3"),
    ]  # fmt: skip
    result = run_script(launch, timeout=600, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Held-out test accuracy:") == 1  # printed by the main process only

    # Two processes trained together, sharded by FSDP2 (not a DDP fallback, not two lone processes).
    card = (out / "README.md").read_text()
    assert "| processes | 2 |" in card
    assert "| distributed | FSDP2 |" in card  # also shows that process 1 did not overwrite the main process' card
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    last_checkpoint = out / "checkpoint-3"
    assert sorted(p.name for p in last_checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # The Trainer writes the model state of a checkpoint this way only under FSDP (a file, or a folder of shards).
    assert [p.name for p in last_checkpoint.glob("pytorch_model_fsdp*")] == [fsdp_checkpoint]

    # Exactly one model in the output directory: the adapter (+ head), written once.
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(("model", "pytorch_model"))]

    # The saved tensors are whole (not one process' shards) and trained: compare with a fresh Mona model.
    saved = load_file(out / "adapter_model.safetensors")
    config = AutoConfig.from_pretrained(out)  # the label map saved with the adapter
    fresh = get_peft_model(
        AutoModelForImageClassification.from_pretrained(model_dir, config=config),
        MonaConfig(bottleneck_dim=8, modules_to_save=["classifier"]),
    )
    expected = get_peft_model_state_dict(fresh)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    zero_at_init = [k for k, v in expected.items() if not v.any()]  # the up-projections (PEFT-style init)
    assert zero_at_init and all(saved[k].any() for k in zero_at_init)

    # PeftModel.from_pretrained onto a fresh base reproduces rank 0's saved test logits and reported accuracy.
    base = AutoModelForImageClassification.from_pretrained(model_dir, config=config)
    model = PeftModel.from_pretrained(base, out).eval()
    reference = load_trained(out)  # for the saved eval preprocessing
    classifier = TrainedClassifier(model, reference.preprocessing, reference.id2label, reference.forward_kwargs)

    data = prepare_data(DataArguments(train_dir=str(images), image_size=32))
    test = data.splits["test"]
    assert len(test) == 7  # odd: the second process pads its last batch, which gathering must drop again
    with (out / "test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["index"]) for row in rows] == list(range(7))
    evaluated = torch.tensor([[float(row[f"logit_{label}"]) for label in data.labels] for row in rows])

    logits = classifier.logits([row[data.image_column] for row in test])
    torch.testing.assert_close(logits, evaluated, rtol=1e-5, atol=1e-5)
    labels = torch.tensor(test[data.label_column])
    reported = json.loads((out / "test_results.json").read_text())
    assert (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(reported["test_accuracy"])
    assert [row["predicted"] for row in rows] == [data.labels[i] for i in logits.argmax(-1).tolist()]
