"""Per-call state of Mona layers: the ViT patch grid and each layer's own call slot, kept per thread and per call.

A block's hooks need to know, while the block runs, the token grid and which adapters apply. ``MonaLayer.forward``
puts that in the layer's own :class:`CallSlot` for the duration of the call; the token grid of ViT-like models is
recorded by :class:`GridTracker` when the patch embedding (or the vision tower) runs. Both are context variables, so
two threads (or two models) never see each other's values.

Gradient checkpointing re-runs a block's ``forward`` during backward, after ``MonaLayer.forward`` has returned, and
PyTorch offers no hook at the start of that re-run. :func:`keep_call_in_checkpoint` therefore wraps the block's
checkpointing function (the ``_gradient_checkpointing_func`` attribute transformers sets on the block) so that the
re-run sees the slot value of the call it replays; :func:`release_checkpoint` restores it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class CallSlot:
    """A context variable that torch.compile can trace, one per owner.

    Dynamo cannot trace ``ContextVar.get``/``set`` (each call would break the graph). While compiling (also under
    ``torch.export``), the value lives in a plain attribute instead, which Dynamo traces as an ordinary Python side
    effect; in eager mode it is a real ``ContextVar``, so threads never see each other's value.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._var: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)
        self._compiled_value: Any = None

    # A ContextVar can be neither copied nor pickled; a copy of a model gets a fresh, empty slot of its own.
    def __deepcopy__(self, memo: dict) -> CallSlot:
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


class GridTracker:
    """Remembers the token grid of the latest image pass through a model, per grid source, in the current context.

    * ``"patch_grid"``: a forward hook on ViT-like patch-embedding convs records ``output.shape[-2:]``, the (h, w)
      patch grid, for the blocks that follow in the same forward. This covers non-square inputs and
      ``interpolate_pos_encoding`` with no image-size arithmetic.
    * ``"tower"``: a forward pre-hook on a vision tower (or its embeddings) records the
      :class:`~mona_peft.tokens.TokenLayout` built from its arguments (SigLIP2's ``spatial_shapes``, Qwen2-VL's
      ``grid_thw``).
    """

    def __init__(self) -> None:
        self._slots = {source: CallSlot(f"mona_{source}_{id(self)}") for source in ("patch_grid", "tower")}

    def patch_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        """Forward hook for a patch-embedding conv."""
        # No int(): under torch.export/compile with a dynamic image size the sizes are symbolic, and int() would bake
        # the example's grid into the graph (an ONNX export would then silently filter later sizes on a wrong grid).
        self._slots["patch_grid"].set(tuple(output.shape[-2:]))

    def tower_hook(self, build: Callable[..., Any]) -> Callable[..., None]:
        """A forward pre-hook (``with_kwargs=True``) that records ``build(module, args, kwargs)``."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._slots["tower"].set(build(module, args, kwargs))

        return hook

    def get(self, source: str) -> Any:
        slot = self._slots.get(source)
        return None if slot is None else slot.get()


_CHECKPOINT_ATTR = "_gradient_checkpointing_func"


def keep_call_in_checkpoint(block: nn.Module, slot: CallSlot) -> None:
    """Wrap ``block``'s gradient-checkpointing function (if any) so that its re-run sees ``slot``'s current value.

    transformers (re)assigns ``_gradient_checkpointing_func`` whenever checkpointing is enabled, so this is checked
    on every call and is idempotent.
    """
    func = block.__dict__.get(_CHECKPOINT_ATTR)
    if func is None or hasattr(func, "_mona_original") or torch.compiler.is_compiling():
        return

    def checkpoint_with_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        value = slot.get()  # captured during forward, reused by the recomputation during backward

        def run_in_call(*inner_args: Any, **inner_kwargs: Any) -> Any:
            token = slot.set(value)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                slot.reset(token)

        return func(run_in_call, *args, **kwargs)

    checkpoint_with_call._mona_original = func
    setattr(block, _CHECKPOINT_ATTR, checkpoint_with_call)


def release_checkpoint(block: nn.Module) -> None:
    """Undo :func:`keep_call_in_checkpoint`."""
    func = block.__dict__.get(_CHECKPOINT_ATTR)
    original = getattr(func, "_mona_original", None)
    if original is not None:
        setattr(block, _CHECKPOINT_ATTR, original)
