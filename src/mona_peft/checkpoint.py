"""Check a saved Mona adapter against the model it is about to be loaded into, before anything is changed.

PEFT injects an adapter into the user's model first and reads its weights afterwards, so a corrupted file or an
adapter trained for another model would otherwise fail (or load partially) after the model has been modified.
``MonaConfig.from_pretrained`` remembers where the adapter came from; ``MonaModel`` calls :func:`check_checkpoint`
before injecting, and raises :class:`MonaCheckpointError` with what is wrong and what to do.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import MonaConfig
from .families import layout_for
from .layer import MonaLayer, block_hidden_size, container_name, conv_part

PEFT_PREFIX = "base_model.model."


class MonaCheckpointError(ValueError):
    """A saved Mona adapter cannot be read, or does not fit the model it is being loaded into."""


@dataclass
class CheckpointSource:
    """Where a Mona adapter config was loaded from (local directory or Hub repo id, plus download arguments)."""

    model_id: str
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        sub = self.hub_kwargs.get("subfolder")
        return f"{self.model_id}" + (f" (subfolder {sub!r})" if sub else "")


def read_weights(source: CheckpointSource) -> dict[str, torch.Tensor]:
    """Read the whole adapter state dict on CPU, turning unreadable files into a clear error."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    try:
        return load_peft_weights(source.model_id, device="cpu", **dict(source.hub_kwargs))
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise MonaCheckpointError(
            f"Cannot read the Mona adapter weights from {source.describe()}: {exc}. The weights file is corrupted "
            "or truncated; save the adapter again or re-download it. Your model was not modified."
        ) from exc


def adapter_shapes(hidden: int, config: MonaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor one block's adapter has under ``config``, keyed like ``mona_attn_down.weight``."""
    m = config.bottleneck_dim
    per_part = {
        "norm": {"weight": (hidden,), "bias": (hidden,)},
        "scale_norm": {"": (hidden,)},  # ParameterDict entries: the key ends at the container name
        "scale_skip": {"": (hidden,)},
        "down": {"weight": (m, hidden), "bias": (m,)},
        "proj": {"weight": (m, m, 1, 1), "bias": (m,)},
        "up": {"weight": (hidden, m), "bias": (hidden,)},
        **{conv_part(k): {"weight": (m, 1, k, k), "bias": (m,)} for k in config.kernel_sizes},
    }
    return {
        container_name(position, part) + (f".{leaf}" if leaf else ""): shape
        for position in config.positions
        for part, leaves in per_part.items()
        for leaf, shape in leaves.items()
    }


def check_checkpoint(
    model: nn.Module, config: MonaConfig, targeted_blocks: list[str], state_dict: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`MonaCheckpointError` unless the adapter weights fit ``model`` and ``config`` exactly."""
    expected: dict[str, tuple[int, ...]] = {}
    for name in targeted_blocks:
        block = model.get_submodule(name)
        block = block.base_layer if isinstance(block, MonaLayer) else block
        shapes = adapter_shapes(block_hidden_size(block), config)
        expected.update({f"{name}.{key}": shape for key, shape in shapes.items()})

    saved = {k.removeprefix(PEFT_PREFIX): tuple(v.shape) for k, v in state_dict.items() if ".mona_" in k}
    unexpected = sorted(set(saved) - set(expected))
    missing = sorted(set(expected) - set(saved))
    wrong = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    if not (unexpected or missing or wrong):
        return

    problems = []
    if wrong:
        k = wrong[0]
        block_name = k.partition(".mona_")[0]
        block = model.get_submodule(block_name)
        block = block.base_layer if isinstance(block, MonaLayer) else block
        problems.append(
            f"{len(wrong)} tensor(s) have the wrong shape, e.g. {k} is {list(saved[k])} but this model "
            f"({type(block).__name__}, hidden size {block_hidden_size(block)}) with bottleneck_dim="
            f"{config.bottleneck_dim} needs {list(expected[k])}"
        )
    if unexpected:
        names = {k.partition(".mona_")[0] for k in unexpected}
        absent = sorted(n for n in names if not _has_supported_block(model, n))
        if absent:
            problems.append(
                f"the adapter has weights for blocks this model does not have (e.g. {absent[0]!r}); it was trained "
                "for another architecture"
            )
        else:
            problems.append(f"{len(unexpected)} tensor(s) do not match the config, e.g. {unexpected[0]}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config needs are missing, e.g. {missing[0]}")
    raise MonaCheckpointError(
        "This Mona adapter does not fit the model: "
        + "; ".join(problems)
        + ". Load it onto the base model it was trained for (see base_model_name_or_path in adapter_config.json), "
        "and check that adapter_config.json belongs to these weights. Your model was not modified."
    )


def _has_supported_block(model: nn.Module, name: str) -> bool:
    try:
        block = model.get_submodule(name)
    except AttributeError:
        return False
    block = block.base_layer if isinstance(block, MonaLayer) else block
    return layout_for(block) is not None
