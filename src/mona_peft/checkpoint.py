"""Saved Mona adapters: the checkpoint format, the 0.1.0 format it replaced, and the checks made before loading.

Format v1 (this version). Each adapter tensor is saved as ``base_model.model.<block>.<container>.<param>``:

* ``<block>``: the block's path as the base model's checkpoints on the Hub spell it, the same on every transformers
  line (e.g. ``vit.encoder.layer.3``, although transformers 5.x calls that module ``vit.layers.3``; see
  :func:`mona_peft.families.canonical_block_path`);
* ``<container>``: ``mona_attn`` (after the attention residual add) or ``mona_mlp`` (after the MLP residual add);
* ``<param>``: a parameter of :class:`~mona_peft.adapter.MonaAdapter`: ``norm.weight``, ``norm.bias``,
  ``scale_norm``, ``scale_skip``, ``down.weight``, ``down.bias``, ``conv3.weight``, ..., ``proj.weight``,
  ``proj.bias``, ``up.weight``, ``up.bias``.

Format 0.1.0 (still loaded): flat keys ``<block>.mona_<attn|mlp>_<part>[.<leaf>]`` under the block path of the
transformers line it was saved with. Loading maps either format, written under either line, to the running model.

Checks. ``MonaConfig.from_pretrained`` reads the weights and checks that they are readable and agree with their
config (:func:`check_consistent`), before any model is touched. When the weights are mapped onto a model
(:func:`to_model_keys`), every tensor must find its block and have the shape that block needs; otherwise the adapter
is taken out again and :class:`MonaCheckpointError` says what is wrong.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
from torch import nn

from .adapter import MonaAdapter
from .config import MonaConfig
from .families import block_path_spellings, canonical_block_path
from .layer import POSITION_CONTAINERS, MonaLayer

PEFT_PREFIX = "base_model.model."
_CONTAINERS = "|".join(POSITION_CONTAINERS.values())
_V1_KEY = re.compile(rf"^(?P<block>.*?)\.(?P<container>{_CONTAINERS})\.(?P<param>.+)$")
_LEGACY_KEY = re.compile(r"\.mona_(attn|mlp)_(norm|scale_norm|scale_skip|down|proj|up|conv\d+)(?=\.|$)")


class MonaCheckpointError(ValueError):
    """A saved Mona adapter cannot be read, or does not fit the model it is being loaded into."""


def read_weights(model_id: str, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read a whole adapter state dict on CPU, turning an unreadable file into a clear error."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    try:
        return load_peft_weights(model_id, device="cpu", **hub_kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        sub = hub_kwargs.get("subfolder")
        where = model_id + (f" (subfolder {sub!r})" if sub else "")
        raise MonaCheckpointError(
            f"Cannot read the Mona adapter weights from {where}: {exc}. The weights file is corrupted or truncated; "
            "save the adapter again or re-download it. Your model was not modified."
        ) from exc


def upgrade_key(key: str) -> str:
    """A key of either format in format v1's layout (``mona_attn_down.weight`` -> ``mona_attn.down.weight``)."""
    return _LEGACY_KEY.sub(r".mona_\1.\2", key)


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(block, container, param)`` of a format-v1 Mona key, or None for another tensor (e.g. a task head)."""
    match = _V1_KEY.match(key)
    return None if match is None else (match["block"], match["container"], match["param"])


@cache
def _adapter_shapes(hidden: int, bottleneck: int, kernels: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    adapter = MonaAdapter(hidden, bottleneck_dim=bottleneck, kernel_sizes=kernels, device="meta")
    return {name: tuple(t.shape) for name, t in adapter.state_dict().items()}


def adapter_shapes(hidden: int, config: MonaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor one block's adapter has under ``config``, keyed like ``mona_attn.down.weight``."""
    shapes = _adapter_shapes(hidden, config.bottleneck_dim, tuple(config.kernel_sizes))
    return {
        f"{POSITION_CONTAINERS[position]}.{name}": shape
        for position in config.positions
        for name, shape in shapes.items()
    }


def _block_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of the Mona tensors of a state dict (either format), grouped by block path."""
    blocks: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        parts = split_key(upgrade_key(key))
        if parts is not None:
            block, container, param = parts
            blocks.setdefault(block, {})[f"{container}.{param}"] = tuple(tensor.shape)
    return blocks


def _compare(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between a block's saved tensors and what it needs, in words, or None."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    if wrong:
        return (
            f"{len(wrong)} tensor(s) have the wrong shape, e.g. {wrong[0]} is {list(found[wrong[0]])} but needs "
            f"{list(expected[wrong[0]])}"
        )
    if unexpected:
        return f"{len(unexpected)} tensor(s) the config does not describe, e.g. {unexpected[0]}"
    if missing:
        return f"{len(missing)} tensor(s) the config needs are missing, e.g. {missing[0]}"
    return None


def check_consistent(config: MonaConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`MonaCheckpointError` unless ``state_dict`` holds exactly the tensors ``config`` describes (for
    blocks of whatever width: that is checked against the model when loading)."""
    blocks = _block_tensors(state_dict)
    if not blocks:
        raise MonaCheckpointError(
            f"{source} holds no Mona weights although its adapter_config.json says peft_type MONA; the folder is "
            "incomplete or mixes files of different adapters. Save the adapter again. Your model was not modified."
        )
    for block, found in blocks.items():
        norm = next((shape for key, shape in found.items() if key.endswith(".norm.weight")), None)
        problem = "it has no LayerNorm weight" if norm is None else _compare(found, adapter_shapes(norm[0], config))
        if problem is not None:
            raise MonaCheckpointError(
                f"The Mona adapter in {source} does not agree with its adapter_config.json (bottleneck_dim="
                f"{config.bottleneck_dim}, kernel_sizes={tuple(config.kernel_sizes)}, positions="
                f"{tuple(config.positions)}): in block {block.removeprefix(PEFT_PREFIX)!r}, {problem}. Check that "
                "adapter_config.json belongs to these weights. Your model was not modified."
            )


def mona_layers(model: nn.Module) -> Iterable[tuple[str, MonaLayer]]:
    """``(name, layer)`` of every Mona layer of ``model``, names without PEFT's ``base_model.model.`` prefix."""
    for name, module in model.named_modules():
        if isinstance(module, MonaLayer):
            yield name.removeprefix(PEFT_PREFIX), module


def to_checkpoint_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Respell the block paths of Mona keys of ``model`` in their canonical (Hub) spelling."""
    canonical = {name: canonical_block_path(name, layer.layout) for name, layer in mona_layers(model)}
    out = {}
    for key, tensor in state_dict.items():
        parts = split_key(key)
        if parts is not None:
            block, container, param = parts
            prefix = PEFT_PREFIX if block.startswith(PEFT_PREFIX) else ""
            key = f"{prefix}{canonical.get(block.removeprefix(PEFT_PREFIX), block.removeprefix(PEFT_PREFIX))}"
            key += f".{container}.{param}"
        out[key] = tensor
    return out


def to_model_keys(
    model: nn.Module, config: MonaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a saved adapter (either format, saved under any supported transformers line) to ``model``'s key names
    (without the adapter name), after checking that every tensor fits; raises :class:`MonaCheckpointError`."""
    layers = {name: layer for name, layer in mona_layers(model) if layer.adapters_of(adapter_name)}
    spelled = {
        spelling: name for name, layer in layers.items() for spelling in block_path_spellings(name, layer.layout)
    }
    prefixed = any(key.startswith(PEFT_PREFIX) for key, _ in model.named_parameters())

    out, found = {}, {}
    for key, tensor in state_dict.items():
        parts = split_key(upgrade_key(key))
        if parts is None:
            out[key] = tensor
            continue
        block, container, param = parts
        name = spelled.get(block.removeprefix(PEFT_PREFIX))
        if name is None:
            raise MonaCheckpointError(
                f"The Mona adapter has weights for block {block.removeprefix(PEFT_PREFIX)!r}, which this "
                f"{type(getattr(model, 'base_model', model)).__name__} does not have among its adapted blocks "
                f"({_examples(layers)}): it was trained for another architecture. Load it onto the base model it was "
                "trained for (base_model_name_or_path in adapter_config.json). Your model was not modified."
            )
        found.setdefault(name, {})[f"{container}.{param}"] = tuple(tensor.shape)
        out[f"{PEFT_PREFIX if prefixed else ''}{name}.{container}.{param}"] = tensor

    for name, layer in layers.items():
        problem = _compare(found.get(name, {}), adapter_shapes(layer.hidden_size, config))
        if problem is not None:
            raise MonaCheckpointError(
                f"The Mona adapter does not fit this model: {problem}, in block {name!r} of this model "
                f"({type(layer.base_layer).__name__}, hidden size {layer.hidden_size}, bottleneck_dim="
                f"{config.bottleneck_dim}). Load it onto the base model it was trained for (base_model_name_or_path "
                "in adapter_config.json). Your model was not modified."
            )
    return out


def _examples(layers: dict[str, MonaLayer]) -> str:
    names = list(layers)
    return ", ".join(repr(n) for n in names[:2]) + (", ..." if len(names) > 2 else "") if names else "none"
