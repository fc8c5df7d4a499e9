"""Share Mona adapters on the Hub: push and pull with the real huggingface_hub client against tests/hub_server.py.

huggingface_hub reads ``HF_ENDPOINT`` when it is imported, and this test process imported it long ago (through
peft), so everything that talks to the Hub runs in fresh Python processes that start with ``HF_ENDPOINT`` pointing at
the local server. One process pushes (the push examples of docs/hub.md, then :func:`_push_side`); a second, fresh one
with an empty cache pulls everything by repo id (the load examples of docs/hub.md, then :func:`_pull_side`) and the
logits are compared exactly. Both run functions of this module and record what happened; the tests below check the
records and the server's state. Card building, argument checks and the import hook are also tested in-process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hub_server import HubServer

ALICE, BOB = "hf_alice_write_token", "hf_bob_token"
TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
DOC = ROOT / "docs" / "hub.md"
PTH_FILE = ROOT / "src" / "mona_peft-autoregister.pth"


# ---------------------------------------------------------------------------------------------------------------------
# What the subprocesses run
# ---------------------------------------------------------------------------------------------------------------------
def doc_blocks(kind: str) -> list[str]:
    """The python blocks of docs/hub.md tagged ``<!-- hub-example: kind -->``, in order."""
    pattern = re.compile(r"<!-- hub-example: (\w+) -->\s*```python\n(.*?)```", flags=re.DOTALL)
    return [code for tag, code in pattern.findall(DOC.read_text()) if tag == kind]


def _attempt(action: Callable[[], Any]) -> dict[str, Any]:
    """Run ``action`` and describe the exception it raises (``{"type": None}`` when it raises none)."""
    try:
        action()
    except Exception as exc:
        cause = exc.__cause__ or exc.__context__
        return {
            "type": type(exc).__name__,
            "bases": [cls.__name__ for cls in type(exc).__mro__],
            "message": str(exc),
            "cause": type(cause).__name__ if cause else None,
            "where": "".join(traceback.format_tb(exc.__traceback__, limit=-4)),
        }
    return {"type": None}


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


def _push_side(out: Path) -> None:
    """Push: base models, Mona adapters (private repo, subfolders, branch), a LoRA adapter, and refused pushes."""
    record: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    for code in doc_blocks("push"):
        exec(compile(code, str(DOC), "exec"), namespace)
    tensors = {"doc": namespace["logits"]}

    import transformers
    from peft import LoraConfig, get_peft_model

    import mona_peft
    from tiny_models import FAMILIES, pixels, randomize_adapter

    x = pixels((32, 32))
    torch.manual_seed(0)
    base = FAMILIES["vit"].build()
    base.push_to_hub("alice/vit-base", token=ALICE)
    tensors["base"] = _logits(base, x)

    def hub_base() -> Any:
        return transformers.ViTForImageClassification.from_pretrained("alice/vit-base", token=ALICE).eval()

    config = mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False, modules_to_save=["classifier"])
    model = get_peft_model(hub_base(), config)
    model.add_adapter("b", mona_peft.MonaConfig(bottleneck_dim=4, kernel_sizes=(3,), init_weights=False))
    randomize_adapter(model, seed=1)
    model.eval()
    tensors["A"] = _logits(model, x)
    model.set_adapter("b")
    tensors["B"] = _logits(model, x)
    model.set_adapter("default")
    commit = model.push_to_hub(
        "alice/vit-mona",
        token=ALICE,
        private=True,
        commit_message="Add Mona adapters",
        datasets="uoft-cs/cifar10",
        metrics={"accuracy": 0.75},
    )
    record["commit_oid"] = commit.oid

    other = get_peft_model(hub_base(), mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False, positions="mlp"))
    randomize_adapter(other, seed=2)
    tensors["C"] = _logits(other.eval(), x)
    mona_peft.push_adapter_to_hub(other, "alice/vit-mona", subfolder="exp", token=ALICE)

    randomize_adapter(model, seed=3)
    tensors["A_dev"] = _logits(model, x)
    model.push_to_hub("alice/vit-mona", token=ALICE, revision="dev", selected_adapters=["default"])

    lora = get_peft_model(FAMILIES["vit"].build(), LoraConfig(r=2, target_modules="all-linear"))
    lora.push_to_hub("alice/vit-lora", token=ALICE)

    wide_base = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
            num_labels=3,
        )
    )
    get_peft_model(wide_base, mona_peft.MonaConfig(bottleneck_dim=8)).push_to_hub("alice/vit48-mona", token=ALICE)

    token = os.environ.pop("HF_TOKEN")
    record["no_token"] = _attempt(lambda: model.push_to_hub("alice/never"))
    os.environ["HF_TOKEN"] = token
    record["wrong_token"] = _attempt(lambda: model.push_to_hub("alice/never", token="hf_not_a_token"))
    record["other_namespace"] = _attempt(lambda: model.push_to_hub("bob/never"))

    torch.save(tensors, out / "push.pt")
    (out / "push.json").write_text(json.dumps(record))


def _pull_side(out: Path, site_dir: str) -> None:
    """Pull everything by repo id in a fresh process, then try the bad inputs."""
    import site

    site.addsitedir(site_dir)  # as if mona_peft-autoregister.pth were installed in site-packages
    from peft import PeftConfig

    record: dict[str, Any] = {}
    hooked = PeftConfig.from_pretrained("alice/vit-mona")  # no `import mona_peft` so far
    record["hook"] = {"config": type(hooked).__name__, "mona_peft_imported": "mona_peft" in sys.modules}

    namespace: dict[str, Any] = {}
    for code in doc_blocks("load"):
        exec(compile(code, str(DOC), "exec"), namespace)
    tensors = {"doc": namespace["logits"]}

    import transformers
    from peft import PeftModel

    import mona_peft
    from mona_peft import MonaLayer
    from tiny_models import pixels

    x = pixels((32, 32))

    def hub_base() -> Any:
        return transformers.ViTForImageClassification.from_pretrained("alice/vit-base").eval()

    tensors["base"] = _logits(hub_base(), x)
    model = PeftModel.from_pretrained(hub_base(), "alice/vit-mona").eval()
    tensors["A"] = _logits(model, x)
    model.load_adapter("alice/vit-mona", adapter_name="b", subfolder="b")
    model.set_adapter("b")
    tensors["B"] = _logits(model, x)
    tensors["C"] = _logits(PeftModel.from_pretrained(hub_base(), "alice/vit-mona", subfolder="exp", token=ALICE), x)
    tensors["A_dev"] = _logits(PeftModel.from_pretrained(hub_base(), "alice/vit-mona", revision="dev"), x)
    tensors["B_helper"] = _logits(mona_peft.load_from_hub(hub_base(), "alice/vit-mona", subfolder="b").eval(), x)
    configs = {
        "main": PeftConfig.from_pretrained("alice/vit-mona"),
        "dev": PeftConfig.from_pretrained("alice/vit-mona", revision="dev", token=ALICE),
        "b": PeftConfig.from_pretrained("alice/vit-mona", subfolder="b"),
    }
    record["configs"] = {k: [type(c).__name__, c.bottleneck_dim] for k, c in configs.items()}

    expected = tensors["base"]

    def untouched(base: Any) -> bool:
        return (
            not any(isinstance(m, MonaLayer) for m in base.modules())
            and not hasattr(base, "peft_config")
            and torch.equal(_logits(base, x), expected)
        )

    # Without access, a fresh cache: huggingface_hub serves a file it cached earlier (with alice's token) even when
    # the server now answers 404, as it does when the Hub cannot be reached.
    cold = {"cache_dir": str(out / "cold-cache")}
    loads: dict[str, Callable[[Any], Any]] = {
        "missing_repo": lambda b: PeftModel.from_pretrained(b, "alice/nope"),
        "missing_revision": lambda b: PeftModel.from_pretrained(b, "alice/vit-mona", revision="nope"),
        "private_without_token": lambda b: PeftModel.from_pretrained(b, "alice/vit-mona", token=False, **cold),
        "private_other_user": lambda b: PeftModel.from_pretrained(b, "alice/vit-mona", token=BOB, **cold),
        "wider_base": lambda b: PeftModel.from_pretrained(b, "alice/vit48-mona"),
        "helper_missing_repo": lambda b: mona_peft.load_from_hub(b, "alice/nope"),
        "helper_missing_revision": lambda b: mona_peft.load_from_hub(b, "alice/vit-mona", revision="nope"),
        "helper_private_without_token": lambda b: mona_peft.load_from_hub(b, "alice/vit-mona", token=False, **cold),
        "helper_private_other_user": lambda b: mona_peft.load_from_hub(b, "alice/vit-mona", token=BOB, **cold),
        "helper_lora": lambda b: mona_peft.load_from_hub(b, "alice/vit-lora"),
        "helper_no_adapter": lambda b: mona_peft.load_from_hub(b, "alice/vit-base"),
        "helper_wrong_subfolder": lambda b: mona_peft.load_from_hub(b, "alice/vit-mona", subfolder="zzz"),
        "helper_wider_base": lambda b: mona_peft.load_from_hub(b, "alice/vit48-mona"),
    }
    bad: dict[str, Any] = {}
    for name, load in loads.items():
        base = hub_base()
        bad[name] = {**_attempt(lambda load=load, base=base: load(base)), "untouched": untouched(base)}

    model.set_adapter("default")
    before = (set(model.peft_config), list(model.state_dict()), _logits(model, x))
    into = {"into_peft_model_lora": "alice/vit-lora", "into_peft_model_wider": "alice/vit48-mona"}
    for name, source in into.items():
        outcome = _attempt(lambda source=source: model.load_adapter(source, adapter_name="extra"))
        after = (set(model.peft_config), list(model.state_dict()), _logits(model, x))
        same = after[:2] == before[:2] and torch.equal(after[2], before[2])
        bad[name] = {**outcome, "untouched": same}
    record["bad"] = bad

    torch.save(tensors, out / "pull.pt")
    (out / "pull.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: the server, and one push process then one pull process
# ---------------------------------------------------------------------------------------------------------------------
def _run_fresh(function: str, hub: HubServer, home: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.pop("MONA_PEFT_AUTOREGISTER", None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_TOKEN=ALICE,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONWARNINGS="ignore",
    )
    code = f"import sys, pathlib, test_hub; test_hub.{function}(pathlib.Path(sys.argv[1]), *sys.argv[2:])"
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, cwd=home
    )
    if result.returncode != 0:
        raise AssertionError(f"{function} failed (exit {result.returncode}):\n{result.stderr[-6000:]}")


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hub_out")
    site_dir = tmp_path_factory.mktemp("site")
    (site_dir / PTH_FILE.name).write_text(PTH_FILE.read_text())
    with HubServer(users={ALICE: "alice", BOB: "bob"}) as hub:
        _run_fresh("_push_side", hub, tmp_path_factory.mktemp("push_home"), str(out))
        _run_fresh("_pull_side", hub, tmp_path_factory.mktemp("pull_home"), str(out), str(site_dir))
    return {
        "hub": hub,
        "push": json.loads((out / "push.json").read_text()),
        "pull": json.loads((out / "pull.json").read_text()),
        "pushed": torch.load(out / "push.pt", weights_only=True),
        "pulled": torch.load(out / "pull.pt", weights_only=True),
    }


def _card(hub: HubServer, repo_id: str, revision: str = "main") -> tuple[dict, str]:
    text = hub.files(repo_id, revision)["README.md"].decode()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
def test_pulled_models_match_pushed_logits_exactly(hub_run: dict[str, Any]) -> None:
    pushed, pulled = hub_run["pushed"], hub_run["pulled"]
    for name in ("base", "A", "B", "C", "A_dev"):
        assert torch.equal(pulled[name], pushed[name]), name
    assert torch.equal(pulled["B_helper"], pushed["B"])
    assert not torch.equal(pushed["A"], pushed["base"]) and not torch.equal(pushed["A"], pushed["A_dev"])
    assert hub_run["pull"]["configs"] == {"main": ["MonaConfig", 8], "dev": ["MonaConfig", 8], "b": ["MonaConfig", 4]}
    assert hub_run["hub"].unhandled == []


def test_docs_example_runs_against_the_server(hub_run: dict[str, Any]) -> None:
    assert len(doc_blocks("push")) == len(doc_blocks("load")) == 2
    untagged = re.findall(r"(?<!-->)\n\n```python", DOC.read_text())
    assert not untagged, "every python block of docs/hub.md must be tagged <!-- hub-example: push|load -->"
    load = doc_blocks("load")[0]
    assert load.index("import mona_peft") < load.index("PeftModel.from_pretrained")
    assert torch.equal(hub_run["pulled"]["doc"], hub_run["pushed"]["doc"])
    hub = hub_run["hub"]
    meta, _ = _card(hub, "alice/mona-demo-vit-adapter")
    assert meta["library_name"] == "peft" and meta["base_model"] == "alice/mona-demo-vit"
    assert hub.repos["alice/mona-demo-collection"].private
    assert "run-1/adapter_config.json" in hub.files("alice/mona-demo-collection")
    assert "adapter_config.json" in hub.files("alice/mona-demo-collection", "lr-sweep")


def test_repo_layout_privacy_and_branches(hub_run: dict[str, Any]) -> None:
    hub = hub_run["hub"]
    main = hub.files("alice/vit-mona")
    for folder in ("", "b/", "exp/"):
        assert {f"{folder}adapter_config.json", f"{folder}adapter_model.safetensors"} <= set(main)
    assert hub.repos["alice/vit-mona"].private and not hub.repos["alice/vit-base"].private
    assert set(hub.repos["alice/vit-mona"].branches) == {"main", "dev"}
    assert main["adapter_model.safetensors"] != hub.files("alice/vit-mona", "dev")["adapter_model.safetensors"]
    assert not any(path.endswith("README.md") and path != "README.md" for path in main)


def test_card_is_a_peft_card(hub_run: dict[str, Any]) -> None:
    meta, body = _card(hub_run["hub"], "alice/vit-mona")
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "alice/vit-base"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"mona", "peft", "base_model:adapter:alice/vit-base"} <= set(meta["tags"])
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["metrics"] == ["accuracy"]
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification" and result["metrics"][0]["value"] == 0.75
    for marker in (".", "b", "exp"):
        assert body.count(f"<!-- mona_peft adapter: {marker} -->") == 1
    assert body.index("import mona_peft") < body.index('PeftModel.from_pretrained(base, "alice/vit-mona")')
    assert 'ViTForImageClassification.from_pretrained("alice/vit-base", num_labels=3' in body
    assert 'subfolder="exp"' in body and 'adapter_name="b", subfolder="b"' in body
    assert "transformers model that has been pushed" not in body

    dev_meta, dev_body = _card(hub_run["hub"], "alice/vit-mona", "dev")
    assert dev_meta["library_name"] == "peft"
    assert 'PeftModel.from_pretrained(base, "alice/vit-mona", revision="dev")' in dev_body


def test_other_methods_keep_transformers_push_to_hub(hub_run: dict[str, Any]) -> None:
    meta, _ = _card(hub_run["hub"], "alice/vit-lora")
    assert meta["library_name"] == "transformers"  # the fix is scoped to Mona adapters
    assert "adapter_config.json" in hub_run["hub"].files("alice/vit-lora")


def test_refused_pushes_say_why_and_create_nothing(hub_run: dict[str, Any]) -> None:
    push = hub_run["push"]
    assert push["no_token"]["type"] == "MonaHubError" and "needs a Hugging Face token" in push["no_token"]["message"]
    assert "HfHubHTTPError" in push["wrong_token"]["bases"]
    assert "Invalid credentials" in push["wrong_token"]["message"]
    assert "HfHubHTTPError" in push["other_namespace"]["bases"] and "403" in push["other_namespace"]["message"]
    assert not {"alice/never", "bob/never"} & set(hub_run["hub"].repos)


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing_repo", "ValueError", "Can't find 'adapter_config.json'"),
        ("missing_revision", "ValueError", "Can't find 'adapter_config.json'"),
        ("private_without_token", "ValueError", "Can't find 'adapter_config.json'"),
        ("private_other_user", "ValueError", "Can't find 'adapter_config.json'"),
        ("wider_base", "MonaCheckpointError", "wrong shape.*hidden size 32"),
        ("helper_missing_repo", "MonaHubError", "no model repository 'alice/nope'"),
        ("helper_missing_revision", "MonaHubError", "has no revision 'nope'. Its branches: dev, main"),
        ("helper_private_without_token", "MonaHubError", "or it is private and no token was found"),
        ("helper_private_other_user", "MonaHubError", "or the token given cannot read it"),
        ("helper_lora", "MonaHubError", "holds a LORA adapter, not a Mona adapter"),
        ("helper_no_adapter", "MonaHubError", "no adapter_config.json.*holds no PEFT adapter"),
        ("helper_wrong_subfolder", "MonaHubError", "Adapters in this repo: '.', 'b', 'exp'"),
        ("helper_wider_base", "MonaCheckpointError", "wrong shape.*hidden size 32"),
        ("into_peft_model_lora", "ValueError", "different peft types|Cannot combine"),
        ("into_peft_model_wider", "MonaCheckpointError", "wrong shape"),
    ],
)
def test_bad_pulls_fail_clearly_and_change_nothing(hub_run: dict, case: str, error: str, message: str) -> None:
    outcome = hub_run["pull"]["bad"][case]
    assert outcome["type"] == error, outcome
    assert re.search(message, outcome["message"], flags=re.DOTALL), outcome["message"]
    assert outcome["untouched"], f"{case} changed the model"


def test_peft_errors_keep_the_hub_cause(hub_run: dict[str, Any]) -> None:
    bad = hub_run["pull"]["bad"]
    assert bad["missing_repo"]["cause"] == "RepositoryNotFoundError"
    assert bad["missing_revision"]["cause"] == "RevisionNotFoundError"


def test_autoregister_hook_loads_without_import(hub_run: dict[str, Any]) -> None:
    assert hub_run["pull"]["hook"] == {"config": "MonaConfig", "mona_peft_imported": True}


# ---------------------------------------------------------------------------------------------------------------------
# In-process, offline
# ---------------------------------------------------------------------------------------------------------------------
def _mona_model(**config_kwargs: Any) -> Any:
    from peft import get_peft_model

    from mona_peft import MonaConfig
    from tiny_models import FAMILIES

    return get_peft_model(FAMILIES["vit"].build(), MonaConfig(bottleneck_dim=8, **config_kwargs))


def test_card_of_a_model_built_from_a_config(caplog: pytest.LogCaptureFixture) -> None:
    from mona_peft.hub import build_model_card

    with caplog.at_level(logging.WARNING):
        card = build_model_card(_mona_model(modules_to_save=["classifier"]), "alice/x", tags=["demo"])
    assert not caplog.records  # a new card starts from an empty metadata block: nothing to warn about
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-classification"
    assert card.data.base_model is None  # no Hub id known: the Hub refuses local paths as base_model
    assert {"mona", "peft", "demo"} <= set(card.data.tags)
    assert "<the base model this adapter was trained on>" in card.text
    assert card.text.count("<!-- mona_peft adapter: . -->") == 1


def test_card_update_keeps_human_text_and_replaces_own_sections() -> None:
    from huggingface_hub import ModelCard

    from mona_peft.hub import build_model_card

    model = _mona_model()
    first = build_model_card(model, "alice/x", base_model="google/vit-base-patch16-224-in21k")
    edited = ModelCard(str(first).replace("# x\n", "# x\n\nHand-written notes.\n") + "\nMore notes.\n")
    edited.data.license = "mit"
    again = build_model_card(model, "alice/x", existing=edited, subfolder="run-2", datasets=["d"], metrics={"acc": 1})
    text = str(again)
    assert "Hand-written notes." in text and "More notes." in text and again.data.license == "mit"
    assert text.count("<!-- mona_peft adapter: . -->") == 1 and text.count("<!-- mona_peft adapter: run-2 -->") == 1
    assert again.data.base_model == "google/vit-base-patch16-224-in21k"
    assert again.data.eval_results[0].metric_value == 1 and again.data.datasets == ["d"]


def test_generated_transformers_card_is_replaced() -> None:
    from huggingface_hub import ModelCard, ModelCardData

    from mona_peft.hub import build_model_card

    generated = ModelCard.from_template(
        ModelCardData(library_name="transformers", tags=["keep-me"]),
        model_description="This is the model card of a 🤗 transformers model that has been pushed on the Hub. "
        "This model card has been automatically generated.",
    )
    card = build_model_card(_mona_model(), "alice/x", existing=generated)
    assert card.data.library_name == "peft" and "keep-me" in card.data.tags
    assert "automatically generated" not in card.text


def test_push_without_token_fails_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from mona_peft.hub import MonaHubError, push_adapter_to_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("reached the Hub"))
    model = _mona_model()
    for call in (lambda: model.push_to_hub("alice/x"), lambda: push_adapter_to_hub(model, "alice/x", token=False)):
        with pytest.raises(MonaHubError, match="needs a Hugging Face token"):
            call()


def test_push_adapter_to_hub_checks_its_arguments() -> None:
    from peft import LoraConfig, get_peft_model

    from mona_peft.hub import MonaHubError, push_adapter_to_hub
    from tiny_models import FAMILIES

    lora = get_peft_model(FAMILIES["vit"].build(), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(MonaHubError, match="holds none"):
        push_adapter_to_hub(lora, "alice/x", token="t")
    with pytest.raises(MonaHubError, match="Unknown adapter"):
        push_adapter_to_hub(_mona_model(), "alice/x", token="t", selected_adapters=["nope"])
    with pytest.raises(MonaHubError, match="subfolder"):
        push_adapter_to_hub(_mona_model(), "alice/x", token="t", subfolder="../up")


def test_read_adapter_config_of_local_folders(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from mona_peft.hub import MonaHubError, read_adapter_config
    from tiny_models import FAMILIES

    _mona_model().save_pretrained(tmp_path / "mona")
    get_peft_model(FAMILIES["vit"].build(), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(
        tmp_path / "lora"
    )
    assert read_adapter_config(tmp_path / "mona")["bottleneck_dim"] == 8
    with pytest.raises(MonaHubError, match="holds a LORA adapter"):
        read_adapter_config(tmp_path / "lora")
    with pytest.raises(MonaHubError, match="does not hold a PEFT adapter"):
        read_adapter_config(tmp_path)


def test_autoregister_hook_mechanism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import _mona_peft_autoregister as hook

    (tmp_path / "fake_peft_pkg").mkdir()
    (tmp_path / "fake_peft_pkg" / "__init__.py").write_text("VALUE = 1\n")
    calls: list[str] = []
    monkeypatch.setattr(hook, "TRIGGER", "fake_peft_pkg")
    monkeypatch.setattr(hook, "register", lambda: calls.append("registered"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    hook.install()
    hook.install()  # idempotent
    assert sum(isinstance(f, hook.PeftImportHook) for f in sys.meta_path) == 1
    import fake_peft_pkg  # noqa: F401

    assert calls == ["registered"]
    assert type(sys.modules["fake_peft_pkg"].__loader__).__name__ == "SourceFileLoader"
    assert not any(isinstance(f, hook.PeftImportHook) for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "fake_peft_pkg")


def test_autoregister_failure_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import _mona_peft_autoregister as hook

    monkeypatch.setitem(sys.modules, "mona_peft", None)  # makes `import mona_peft` fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook.register()
    assert any("could not register" in str(w.message) for w in caught)
    monkeypatch.setenv(hook.ENV_VAR, "0")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, hook.TRIGGER)
    hook.install()
    assert not any(isinstance(f, hook.PeftImportHook) for f in sys.meta_path)
