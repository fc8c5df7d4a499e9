"""Register Mona with PEFT as soon as PEFT is imported: loading a Mona adapter then works without `import mona_peft`.

Installed with mona_peft as a top-level module plus ``mona_peft-autoregister.pth`` in site-packages, whose single line
``import _mona_peft_autoregister`` Python runs at start-up (the mechanism of virtualenv's ``_virtualenv.pth`` and
setuptools' ``distutils-precedence.pth``). Start-up cost: this module (stdlib only) puts one finder at the front of
``sys.meta_path``; nothing else is imported. When a program later imports ``peft``, the finder lets the normal import
run to completion and then imports ``mona_peft`` (about 0.05 s once PEFT is loaded), which registers the ``MONA`` PEFT
type; the finder then removes itself.

Safety: ``import peft`` never fails because of this module (a failure to import ``mona_peft`` becomes a
``RuntimeWarning``); the loader of ``peft`` seen by introspection is PEFT's own; ``MONA_PEFT_AUTOREGISTER=0`` turns it
off; ``python -S`` (no site) skips it, and then an explicit ``import mona_peft`` is needed, as without the hook.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # `typing` is not loaded at start-up; type checkers treat this name as typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

ENV_VAR = "MONA_PEFT_AUTOREGISTER"
TRIGGER = "peft"


def register() -> None:
    """Import mona_peft (which registers Mona with PEFT); a failure is a warning, never an exception."""
    try:
        import mona_peft  # noqa: F401
    except Exception as exc:  # must never break `import peft`
        import warnings

        warnings.warn(
            f"mona_peft could not register the Mona method with PEFT ({type(exc).__name__}: {exc}). Loading Mona "
            f"adapters will fail until `import mona_peft` works; set {ENV_VAR}=0 to stop this automatic attempt.",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterExec:
    """Loader wrapper: runs PEFT's own loader, then :func:`register`."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put PEFT's own loader back before running it, so that introspection never sees this wrapper.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        uninstall()
        register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PeftImportHook:
    """A ``sys.meta_path`` finder that only reacts to the top-level ``peft`` package."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None):
        if fullname != TRIGGER:
            return None
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, PeftImportHook) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Arrange for :func:`register` to run right after ``peft`` is imported (or now, if it already is)."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(finder, PeftImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())


def uninstall() -> None:
    """Remove the finder from ``sys.meta_path``."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftImportHook)]


try:  # noqa: SIM105 - contextlib is not loaded at start-up; a start-up hook must never stop the interpreter
    install()
except Exception:
    pass
