"""Registration with PEFT: the PeftType member, idempotence, other Python versions, the README example."""

from __future__ import annotations

import enum
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import mona_peft
from mona_peft import registration

ROOT = Path(__file__).resolve().parents[1]


def test_mona_is_a_peft_type_and_registered() -> None:
    assert PeftType("MONA") is PeftType.MONA
    assert "MONA" in list(PeftType) and PeftType.MONA == "MONA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MONA] is mona_peft.MonaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MONA] is mona_peft.MonaModel
    assert isinstance(PeftConfig.from_peft_type(peft_type="MONA"), mona_peft.MonaConfig)


def test_registration_is_idempotent() -> None:
    members = list(PeftType)
    mona_peft.register_with_peft()
    importlib.reload(registration).register_with_peft()
    registration.extend_str_enum(PeftType, "MONA", "MONA")
    assert list(PeftType) == members


def test_extend_refuses_conflicts_and_non_str_enums() -> None:
    class Colour(str, enum.Enum):
        RED = "RED"

    with pytest.raises(ValueError, match="already exists"):
        registration.extend_str_enum(Colour, "RED", "red")
    with pytest.raises(ValueError, match="already has a member"):
        registration.extend_str_enum(Colour, "CRIMSON", "RED")

    class Plain(enum.Enum):
        A = 1

    with pytest.raises(TypeError, match="not a str enum"):
        registration.extend_str_enum(Plain, "B", "B")


_STANDALONE = """
import enum, importlib.util, sys
spec = importlib.util.spec_from_file_location("registration", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

class Kind(str, enum.Enum):
    LORA = "LORA"

member = module.extend_str_enum(Kind, "MONA", "MONA")
assert module.extend_str_enum(Kind, "MONA", "MONA") is member
assert Kind.MONA is member and Kind("MONA") is member and Kind["MONA"] is member
assert list(Kind) == [Kind.LORA, Kind.MONA] and "MONA" in Kind.__members__
assert member == "MONA" and isinstance(member, str) and member.name == "MONA" and member.value == "MONA"
assert {Kind.MONA: 1}["MONA"] == 1
print("ok", sys.version_info[:2])
"""


def _interpreters() -> list[str]:
    found = [sys.executable]
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        candidates = sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{minor}*/bin/python{minor}"))
        path = shutil.which(f"python{minor}")
        if path and "shims" not in path:  # pyenv shims refuse versions that are not selected
            candidates.append(path)
        found += candidates[:1]
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("python", _interpreters())
def test_enum_extension_on_each_python(python: str) -> None:
    """The enum surgery relies on CPython internals; run it on every supported Python found on this machine."""
    result = subprocess.run(
        [python, "-c", _STANDALONE, str(ROOT / "src/mona_peft/registration.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_readme_usage_example_runs(tmp_path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the example is ours
    assert namespace["logits"].shape == (2, 5)
    assert (tmp_path / "mona-adapter" / "adapter_model.safetensors").exists()
    assert type(namespace["reloaded"].peft_config["default"]) is mona_peft.MonaConfig
