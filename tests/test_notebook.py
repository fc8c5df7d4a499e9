"""notebooks/finetune_mona.ipynb runs top to bottom (2 training steps, 16 evaluation images) without a failing cell.

Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (skipped without them) and the offline DINOv2-small backbone.
"""

from __future__ import annotations

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
        MONA_NOTEBOOK_MAX_STEPS="2", MONA_NOTEBOOK_MAX_EVAL_SAMPLES="16", MONA_NOTEBOOK_OUTPUT_DIR=str(out),
        MPLBACKEND="Agg",
    )  # fmt: skip
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    assert (out / "adapter_model.safetensors").exists() and (out / "training_curves.png").exists()
    assert "import mona_peft" in (out / "README.md").read_text()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "reloaded test accuracy" in printed
