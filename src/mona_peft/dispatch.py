"""Mona on big models dispatched by accelerate (``device_map``, CPU and disk offload).

A base loaded with ``from_pretrained(..., device_map=..., offload_folder=...)`` (or dispatched with
``accelerate.dispatch_model`` / ``cpu_offload``) carries accelerate hooks: each module's ``forward`` moves its inputs
to the module's *execution device* and, for offloaded modules, loads the weights there for the call and puts them back
on ``meta`` afterwards. Mona keeps that dispatch exactly as it is:

* **Adapters** live on their block's execution device (:func:`mona_peft.layer.execution_device`), as ordinary
  resident, trainable parameters; they are never offloaded and never on ``meta``. Mona's hooks are ordinary PyTorch
  hooks, so accelerate's hooks stay in place, and ``unload()`` gives back the base with them.
* **Placement check** (:func:`check_placement`, run before anything is changed): a block whose weights are on ``meta``
  with no accelerate hook saying where it runs (offloaded weights whose hooks were removed), or a block split across
  several execution devices, cannot host an adapter: :class:`MonaDispatchError` says what to do and the model is left
  as it was. A model built entirely on ``meta`` on purpose (no hooks, no ``hf_device_map``; e.g. to count
  parameters) is not refused: its adapters are created on ``meta`` too.
* **Trained head copies** (``modules_to_save``): PEFT deep-copies the head with its accelerate hook, so the copy of an
  offloaded head would reload the *original* head weights from the offload store at every call (a trained or loaded
  head would be silently ignored), and copying the hook copies its whole weights store (with CPU offload on a GPU
  machine: every CPU-offloaded weight of the model). :func:`keep_offloaded_heads` makes the copy share the store
  instead, then makes each copied head resident on its execution device with a device-aligning hook that does not
  offload. The original head keeps its offloading hook (used by ``disable_adapter()``); ``unload()`` returns the
  trained copy in its place, as PEFT does for every method.
* **Loading** (:func:`install_offload_loading`): for a base whose ``hf_device_map`` has ``"cpu"`` or ``"disk"``
  entries, ``PeftModel.from_pretrained`` removes every accelerate hook and ``load_adapter`` re-dispatches the whole
  PeftModel with a new device map through ``PeftModel._update_offload``, which assumes per-``Linear`` adapters (it
  raises ``KeyError`` for Mona, and for LoRA on transformers 5.x). For **Mona adapters only**, these two methods run
  PEFT's own code with the base's ``hf_device_map`` hidden for the duration of the call, so the base keeps its
  dispatch; every other adapter type goes through PEFT unchanged.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .layer import MonaLayer

OFFLOAD_PLACES = frozenset({"cpu", "disk"})


class MonaDispatchError(ValueError):
    """A Mona adapter cannot be placed on a base model dispatched (or offloaded) by accelerate."""


# --------------------------------------------------------------------------------------------------- accelerate hooks
def _align_hooks(module: nn.Module) -> list[Any]:
    """The ``AlignDevicesHook`` objects attached to ``module`` itself (a ``SequentialHook`` holds several)."""
    from accelerate.hooks import AlignDevicesHook

    hook = module.__dict__.get("_hf_hook")  # not getattr: PEFT's wrappers forward attribute lookups
    if hook is None:
        return []
    return [inner for inner in getattr(hook, "hooks", (hook,)) if isinstance(inner, AlignDevicesHook)]


def _device(device: Any) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _meta_tensors(module: nn.Module) -> list[str]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [name for name, tensor in tensors if tensor is not None and tensor.device.type == "meta"]


def offloads(model: nn.Module) -> bool:
    """Whether ``model`` was dispatched with parts on ``"cpu"`` or ``"disk"``: the case in which PEFT's
    ``from_pretrained`` / ``load_adapter`` remove and redo the dispatch."""
    device_map = getattr(model, "hf_device_map", None)
    return isinstance(device_map, Mapping) and bool(OFFLOAD_PLACES & {str(v) for v in device_map.values()})


# ------------------------------------------------------------------------------------------------- placement check
def check_placement(model: nn.Module, blocks: Iterable[str], heads: Iterable[str] | None) -> None:
    """Raise :class:`MonaDispatchError` unless every targeted block (by name) can host a Mona adapter and every
    ``modules_to_save`` head (PEFT's suffix match) can be copied with its weights. Changes nothing."""
    if _is_skeleton(model):
        return  # built on meta on purpose (e.g. to count parameters): the adapters stay on meta too (see layer.py)
    problems: list[str] = []
    unloaded = False  # some weights on meta with nothing to load them
    for name in blocks:
        block = model.get_submodule(name)
        block = block.base_layer if isinstance(block, MonaLayer) else block
        devices = {
            str(_device(h.execution_device))
            for m in block.modules()
            for h in _align_hooks(m)
            if h.execution_device is not None
        }
        if len(devices) > 1:
            problems.append(
                f"block '{name}' is split across the execution devices {', '.join(sorted(devices))} by the device "
                "map; Mona needs each block on one device: keep blocks whole (a device_map that maps whole blocks, "
                "or the model's `_no_split_modules`, which accelerate's device_map='auto' respects)"
            )
        elif not devices:
            meta = [f"{sub}.{t}".lstrip(".") for sub, m in block.named_modules() for t in _meta_tensors(m)]
            if meta:
                unloaded = True
                listed = ", ".join(meta[:3]) + (", ..." if len(meta) > 3 else "")
                problems.append(
                    f"block '{name}' has weights on the meta device ({listed}) and no accelerate hook that says where "
                    "it runs or loads them"
                )
    for name in _head_names(model, heads):
        head = model.get_submodule(name)
        head = getattr(head, "original_module", head)  # already wrapped by PEFT for another adapter
        for sub_name, sub in head.named_modules():
            meta = _meta_tensors(sub)
            if meta and not _offloaded_by_hook(head, sub_name, meta):
                unloaded = True
                where = f"{name}.{sub_name}" if sub_name else name
                problems.append(
                    f"the trained head '{where}' (modules_to_save) has weights on the meta device ({', '.join(meta)}) "
                    "and no accelerate hook of its own that loads them, so its trainable copy cannot be made"
                )
    if problems:
        advice = (
            " This happens when accelerate's hooks were removed from an offloaded model (e.g. with "
            "accelerate.hooks.remove_hook_from_submodules) or when only part of the model was built on the meta "
            "device. Load the base again with its weights, or with `device_map=...` (and `offload_folder=...` for "
            "disk offload) so that accelerate dispatches it, then wrap it or load the adapter."
            if unloaded
            else ""
        )
        raise MonaDispatchError(
            f"Mona cannot be placed on this {type(model).__name__}: {'; '.join(problems)}.{advice} The model was "
            "not changed."
        )


def _is_skeleton(model: nn.Module) -> bool:
    """A model built on the meta device on purpose: every parameter on meta, and nothing says it was dispatched (no
    accelerate hook, no ``hf_device_map``), unlike an offloaded model whose hooks were removed."""
    for module in model.modules():
        if "_hf_hook" in module.__dict__ or "hf_device_map" in module.__dict__:
            return False
    return all(p.device.type == "meta" for p in model.parameters())


def _head_names(model: nn.Module, heads: Iterable[str] | None) -> list[str]:
    if not heads:
        return []
    heads = list(heads)
    names = []
    for key, _ in model.named_modules():
        if not any(key.endswith(head) for head in heads):
            continue
        # names inside a PEFT wrapper (``classifier.modules_to_save.default``) are not heads of their own
        if ".modules_to_save." in key or ".original_module" in key:
            continue
        names.append(key)
    return names


def _offloaded_by_hook(head: nn.Module, sub_name: str, names: list[str]) -> bool:
    """Whether an offloading hook inside ``head`` (on the sub-module or on an ancestor that places its sub-modules)
    holds the weights ``names`` of the sub-module ``sub_name``."""
    parts = sub_name.split(".") if sub_name else []
    for depth in range(len(parts), -1, -1):
        owner = head.get_submodule(".".join(parts[:depth]))
        rest = ".".join(parts[depth:])
        for hook in _align_hooks(owner):
            if not hook.offload or hook.weights_map is None or (rest and not hook.place_submodules):
                continue
            if all(f"{rest}.{n}".lstrip(".") in hook.weights_map for n in names):
                return True
    return False


# ------------------------------------------------------------------------------------------- modules_to_save copies
class _SharedOnCopy(Mapping):
    """An accelerate weights map that ``copy.deepcopy`` shares instead of copying (while PEFT copies a head)."""

    def __init__(self, inner: Mapping) -> None:
        self.inner = inner

    def __getitem__(self, key: str) -> Any:
        return self.inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __deepcopy__(self, memo: dict) -> _SharedOnCopy:
        return self

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@contextmanager
def keep_offloaded_heads(model: nn.Module) -> Iterator[None]:
    """Around PEFT's adapter injection: copies of offloaded heads share the offload store instead of copying it, and
    afterwards every ``modules_to_save`` copy that would still offload becomes resident (see
    :func:`make_resident`). Does nothing on a model without accelerate hooks."""
    shared = []
    for module in model.modules():
        for hook in _align_hooks(module):
            if hook.offload and hook.weights_map is not None and not isinstance(hook.weights_map, _SharedOnCopy):
                shared.append((hook, hook.weights_map))
                hook.weights_map = _SharedOnCopy(hook.weights_map)
    try:
        yield
        if shared:
            for copy in head_copies(model):
                make_resident(copy)
    finally:
        for hook, weights_map in shared:
            hook.weights_map = weights_map


def head_copies(model: nn.Module) -> list[nn.Module]:
    """The per-adapter copies that PEFT's ``modules_to_save`` wrappers hold in ``model``."""
    from peft.utils.other import ModulesToSaveWrapper

    return [
        copy
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
        for copy in module.modules_to_save.values()
    ]


def make_resident(module: nn.Module) -> nn.Module:
    """Turn every offloading accelerate hook in ``module`` into a device-aligning hook that does not offload: the
    weights it would load at each call are loaded once, as private copies, on its execution device (so training them
    sticks and nothing shares memory with the offload store). Inputs are still moved to that device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    for sub in list(module.modules()):
        attached = sub.__dict__.get("_hf_hook")
        hooks = list(getattr(attached, "hooks", (attached,))) if attached is not None else []
        offloading = [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]
        if not offloading:
            continue
        values = {}
        for hook in offloading:
            device = _device(hook.execution_device)
            tensors = named_module_tensors(
                sub, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
            )
            for name, _ in tensors:
                values[name] = (hook.weights_map[name].to(device, copy=True), device)
        remove_hook_from_module(sub)
        for name, (value, device) in values.items():
            set_module_tensor_to_device(sub, name, device, value=value)
        for position, hook in enumerate(hooks):
            if hook in offloading:
                hook = AlignDevicesHook(
                    execution_device=hook.execution_device,
                    offload=False,
                    io_same_device=hook.io_same_device,
                    place_submodules=hook.place_submodules,
                    skip_keys=hook.skip_keys,
                )
            add_hook_to_module(sub, hook, append=position > 0)
    return module


# ---------------------------------------------------------------------------------------------------------- loading
@contextmanager
def hidden_device_map(model: nn.Module) -> Iterator[None]:
    """Hide ``model.hf_device_map`` for the duration (restored even on error), so that PEFT's loading code neither
    removes accelerate's hooks nor re-dispatches the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner = next((m for m in base.modules() if "hf_device_map" in m.__dict__), None)
    if owner is None:
        yield
        return
    device_map = owner.__dict__.pop("hf_device_map")
    try:
        yield
    finally:
        owner.__dict__["hf_device_map"] = device_map


def _is_mona_adapter(model_id: Any, config: Any, hub_kwargs: dict[str, Any]) -> bool:
    from peft import PeftConfig

    from .config import MonaConfig

    if config is not None:
        return isinstance(config, MonaConfig)
    try:
        peft_type = PeftConfig._get_peft_type(model_id, **hub_kwargs)
    except Exception:  # let PEFT report an unreadable adapter its own way
        return False
    return str(getattr(peft_type, "value", peft_type)).upper() == "MONA"


def _warn_unused_dispatch_kwargs(kwargs: dict[str, Any]) -> None:
    given = [name for name in _REDISPATCH_KWARGS if kwargs.get(name) is not None]
    if given:
        warnings.warn(
            f"{', '.join(given)} not used: a Mona adapter is loaded onto the base as accelerate dispatched it, PEFT's "
            "re-dispatch is skipped. To change where the base runs, load or dispatch the base with that map first.",
            UserWarning,
            stacklevel=3,
        )


_REDISPATCH_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")
_CONFIG_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token")


def install_offload_loading() -> None:
    """Let ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` load **Mona** adapters onto a base offloaded to
    CPU or disk without removing and redoing its accelerate dispatch (idempotent; other adapter types are untouched).
    """
    from peft import PeftModel

    from_pretrained = PeftModel.__dict__["from_pretrained"].__func__
    if getattr(from_pretrained, "_mona_peft_original", None) is None:
        signature = inspect.signature(from_pretrained)

        @functools.wraps(from_pretrained)
        def mona_from_pretrained(cls: type, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
            if offloads(model):
                bound = signature.bind(cls, model, model_id, *args, **kwargs).arguments
                extra = bound.get("kwargs", {})
                hub_kwargs = {k: extra[k] for k in _CONFIG_HUB_KWARGS if extra.get(k) is not None}
                if _is_mona_adapter(model_id, bound.get("config"), hub_kwargs):
                    _warn_unused_dispatch_kwargs(extra)
                    with hidden_device_map(model):
                        return from_pretrained(cls, model, model_id, *args, **kwargs)
            return from_pretrained(cls, model, model_id, *args, **kwargs)

        mona_from_pretrained._mona_peft_original = from_pretrained  # type: ignore[attr-defined]
        PeftModel.from_pretrained = classmethod(mona_from_pretrained)

    load_adapter = PeftModel.load_adapter
    if getattr(load_adapter, "_mona_peft_original", None) is None:
        load_signature = inspect.signature(load_adapter)

        @functools.wraps(load_adapter)
        def mona_load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
            if offloads(self):
                extra = load_signature.bind(self, model_id, adapter_name, *args, **kwargs).arguments.get("kwargs", {})
                hub_kwargs = {k: extra[k] for k in _CONFIG_HUB_KWARGS if extra.get(k) is not None}
                if _is_mona_adapter(model_id, self.peft_config.get(adapter_name), hub_kwargs):
                    _warn_unused_dispatch_kwargs(extra)
                    with hidden_device_map(self):
                        return load_adapter(self, model_id, adapter_name, *args, **kwargs)
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)

        mona_load_adapter._mona_peft_original = load_adapter  # type: ignore[attr-defined]
        PeftModel.load_adapter = mona_load_adapter
