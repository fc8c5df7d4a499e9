"""``scripts/train.py --push_to_hub`` against the local Hub-compatible server (tests/hub_server.py): the Trainer's
upload carries this project's model card (not transformers' generic one), the adapter and the label map, and the
pushed adapter is byte-for-byte the one saved locally, which reloads in a fresh process by repo id."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hub_server import HubServer
from training_helpers import TRAIN_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args

TOKEN = "hf_alice_write_token"
REPO_ID = "alice/mona-tiny-dinov2"


def _hub_env(hub: HubServer, home: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def test_push_to_hub_uploads_the_adapter_with_this_projects_card(tmp_path: Path) -> None:
    model = make_tiny_checkpoint(tmp_path / "model", "dinov2")
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    with HubServer(users={TOKEN: "alice"}) as hub:
        args = [str(TRAIN_SCRIPT), *tiny_train_args(model, images, out, "--push_to_hub", "--hub_model_id", REPO_ID)]
        result = run_script(args, **_hub_env(hub, tmp_path / "home"))
        assert result.returncode == 0, result.stderr[-4000:]
        files = hub.files(REPO_ID)
        assert not hub.unhandled, hub.unhandled

        assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
        config = json.loads(files["adapter_config.json"])
        assert config["peft_type"] == "MONA" and config["bottleneck_dim"] == 8
        assert (
            json.loads(files["config.json"])["id2label"] == json.loads((out / "config.json").read_text())["id2label"]
        )
        assert "preprocessor_config.json" in files
        assert not any(name.startswith("checkpoint-") for name in files)

        card = files["README.md"].decode()
        assert card == (out / "README.md").read_text()
        _, meta, body = card.split("---\n", 2)
        meta = yaml.safe_load(meta)
        assert meta["library_name"] == "peft" and "mona" in meta["tags"]
        assert "## Training" in body and "import mona_peft" in body
        assert REPO_ID in body  # the usage snippet loads the adapter by its Hub id

        # a fresh process (empty cache) loads the adapter by repo id and predicts the same as the local copy
        check = (
            "import sys, torch, mona_peft\n"
            "from mona_peft.training import load_trained\n"
            "x = torch.rand(2, 3, 32, 32)\n"
            "hub = load_trained(sys.argv[1], base_model=sys.argv[3]).model(pixel_values=x).logits\n"
            "local = load_trained(sys.argv[2]).model(pixel_values=x).logits\n"
            "torch.testing.assert_close(hub, local, rtol=0, atol=0)\n"
            "print('same')\n"
        )
        result = run_script(["-c", check, REPO_ID, str(out), str(model)], **_hub_env(hub, tmp_path / "home2"))
        assert result.returncode == 0 and "same" in result.stdout, result.stderr[-4000:]
