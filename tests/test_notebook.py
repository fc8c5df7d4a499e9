"""notebooks/finetune_mona.ipynb runs top to bottom (2 training steps, 16 evaluation images) without a failing cell,
through the public API (get_peft_model, Trainer, save_pretrained, PeftModel.from_pretrained), and leaves a Mona adapter
that reproduces the trained model's predictions (the notebook asserts that itself).

Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (skipped without them) and the offline DINOv2-small backbone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from training_helpers import REPO, offline_env  # noqa: E402

NOTEBOOK = REPO / "notebooks" / "finetune_mona.ipynb"

pytestmark = pytest.mark.slow  # a kernel that loads and trains the real DINOv2-small: ~1 min on 2 CPU cores


def test_notebook_runs_without_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "notebook-run"
    env = offline_env(
        MONA_NOTEBOOK_MAX_STEPS="2", MONA_NOTEBOOK_MAX_EVAL_SAMPLES="16", MONA_NOTEBOOK_OUTPUT_DIR=str(out)
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, so that the figures become outputs
    monkeypatch.delenv("MPLBACKEND", raising=False)
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    for api in ("get_peft_model(", "MonaConfig(", "TrainingArguments(", "Trainer(", "PeftModel.from_pretrained("):
        assert api in source, f"the notebook no longer shows {api}"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails (e.g. the reload check)

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MONA" and adapter_config["modules_to_save"] == ["classifier"]
    for name in ("adapter_model.safetensors", "preprocessor_config.json", "training_curves.png"):
        assert (out / name).exists(), name
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs)
    assert "trainable params:" in printed  # print_trainable_parameters()
    accuracy = re.search(r"test accuracy (\d\.\d+) on 16 images", printed)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0, printed[-2000:]
    assert "same predictions on all 16 test images: True" in printed
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 2, "the loss curves and the predictions"
