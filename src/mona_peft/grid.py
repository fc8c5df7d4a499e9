"""Per-call state that Mona's hooks need: the token grid, and the first Mona's delta between two hooks.

Everything lives in context variables, so two threads (or two models) never see each other's grid. Gradient
checkpointing re-runs a block's ``forward`` during backward, outside the original call; the block's checkpoint
function is therefore wrapped so that the re-run sees the same :class:`BlockCall` as the original forward.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _CompilableContextVar:
    """A context variable that torch.compile can trace.

    Dynamo cannot trace ``ContextVar.get``/``set`` (each call would break the graph, twice per block). While compiling,
    the value lives in a plain attribute instead, which Dynamo traces as an ordinary Python side effect; in eager mode
    it is a real ``ContextVar``, so threads never see each other's value.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._var: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)
        self._compiled_value: Any = None

    # A ContextVar can be neither copied nor pickled; a copy of a model gets a fresh, empty slot of its own.
    def __deepcopy__(self, memo: dict) -> _CompilableContextVar:
        return type(self)(self._name)

    def __reduce__(self) -> tuple:
        return (type(self), (self._name,))

    def get(self) -> Any:
        return self._compiled_value if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: Any) -> contextvars.Token | None:
        if torch.compiler.is_compiling():
            self._compiled_value = value
            return None
        return self._var.set(value)

    def reset(self, token: contextvars.Token | None) -> None:
        if token is None:
            self._compiled_value = None
        else:
            self._var.reset(token)


_current_call = _CompilableContextVar("mona_block_call")


@dataclass
class BlockCall:
    """One call of one Mona-wrapped block."""

    layer: nn.Module
    grid: tuple[int, int]
    adapters: tuple[str, ...]
    # mona_1(x1) - x1, set by the entry hook and consumed by the join hook.
    pending: torch.Tensor | None = field(default=None, repr=False)


def current_call() -> BlockCall | None:
    """The block call in progress in this context, if any."""
    return _current_call.get()


@contextmanager
def block_call(call: BlockCall | None) -> Iterator[None]:
    """Make ``call`` the current block call for the duration of the ``with`` body."""
    token = _current_call.set(call)
    try:
        yield
    finally:
        _current_call.reset(token)


class PatchGridTracker:
    """Remembers the (h, w) patch grid of the latest ViT-family embedding pass in the current context.

    A forward hook on the patch-embedding conv records ``output.shape[-2:]``; the blocks that follow in the same
    forward read it. This covers non-square inputs and ``interpolate_pos_encoding`` with no image-size arithmetic.
    """

    def __init__(self) -> None:
        self._grid = _CompilableContextVar(f"mona_patch_grid_{id(self)}")

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        """Forward hook for the patch-embedding conv."""
        self._grid.set((int(output.shape[-2]), int(output.shape[-1])))

    def get(self) -> tuple[int, int] | None:
        return self._grid.get()


_CHECKPOINT_ATTR = "_gradient_checkpointing_func"


def keep_call_in_checkpoint(block: nn.Module) -> None:
    """Wrap ``block``'s gradient-checkpointing function (if any) so its re-run sees the current block call.

    transformers (re)assigns ``_gradient_checkpointing_func`` whenever checkpointing is enabled, so this is checked
    on every call and is idempotent.
    """
    func = block.__dict__.get(_CHECKPOINT_ATTR)
    if func is None or hasattr(func, "_mona_original") or torch.compiler.is_compiling():
        return

    def checkpoint_with_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = current_call()  # captured during forward, reused by the recomputation during backward

        def run_in_call(*inner_args: Any, **inner_kwargs: Any) -> Any:
            with block_call(call):
                return function(*inner_args, **inner_kwargs)

        return func(run_in_call, *args, **kwargs)

    checkpoint_with_call._mona_original = func
    setattr(block, _CHECKPOINT_ATTR, checkpoint_with_call)


def release_checkpoint(block: nn.Module) -> None:
    """Undo :func:`keep_call_in_checkpoint`."""
    func = block.__dict__.get(_CHECKPOINT_ATTR)
    original = getattr(func, "_mona_original", None)
    if original is not None:
        setattr(block, _CHECKPOINT_ATTR, original)
