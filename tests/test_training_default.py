"""The documented smoke command on the offline default (real DINOv2-small, embedded textile images), then predict.py
on its output. Slow: it evaluates the real backbone on 200 validation and 300 test images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from mona_peft.training import load_trained
from mona_peft.training.data import default_data_dir
from training_helpers import PREDICT_SCRIPT, TRAIN_SCRIPT, run_script

pytestmark = pytest.mark.slow


def test_smoke_command_on_the_offline_default(tmp_path: Path) -> None:
    out = tmp_path / "default"
    result = run_script(
        [str(TRAIN_SCRIPT), "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4"],
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train 1500, validation 200, test 300 images" in result.stdout
    assert "Held-out test accuracy:" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "preprocessor_config.json",
                 "README.md", "training_curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    readme = (out / "README.md").read_text()
    assert "base_model: facebook/dinov2-small" in readme and "library_name: peft" in readme
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "global", "1": "local", "2": "nominal"}

    # the card's own "PEFT and transformers directly" snippet loads the adapter with PeftModel.from_pretrained
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    direct = next(code for code in snippets if "PeftModel.from_pretrained" in code)
    namespace: dict = {}
    exec(direct, namespace)
    model = namespace["model"]
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "MONA"
    pixels = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        expected = load_trained(out).model(pixel_values=pixels).logits
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=0, atol=0)

    image = next((default_data_dir() / "local").glob("*.jpg"))
    predicted = run_script([str(PREDICT_SCRIPT), "--model", str(out), "--json", str(image)], timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (row,) = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert {p["label"] for p in row["predictions"]} <= {"global", "local", "nominal"}
