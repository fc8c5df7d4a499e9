"""FSDP on CPU-only machines, and saving a PEFT adapter from a sharded model.

Two gaps between ``accelerate`` and a CPU-only multi-process run that this module closes:

- **FSDP on CPUs.** ``accelerate launch --use_fsdp`` (or an accelerate config with ``distributed_type: FSDP``) starts
  the processes with ``ACCELERATE_USE_FSDP=true``, but ``accelerate.AcceleratorState`` switches to FSDP only on top of
  an accelerator backend (CUDA, XPU, ...). Without one, the processes form a CPU (gloo) group and accelerate silently
  falls back to DDP (``MULTI_CPU``), while transformers already loaded the checkpoint on the ``meta`` device on every
  rank but the first (``fsdp_cpu_ram_efficient_loading``), so DDP then fails. :func:`enable_cpu_fsdp` turns such a
  trainer's accelerator into an FSDP one. FSDP2's ``fully_shard`` runs on CPU tensors over gloo.
- **Saving the adapter.** ``Trainer.save_model`` under FSDP writes the model only with
  ``fsdp_state_dict_type: FULL_STATE_DICT`` (FSDP2's default, ``SHARDED_STATE_DICT``, writes nothing at all), and
  then gathers the whole model, frozen backbone included, on the main process. :func:`gather_adapter_state_dict`
  gathers only the tensors a PEFT adapter saves (adapter + ``modules_to_save``), whatever the state-dict type, and
  the main process alone writes them (``RecipeTrainer.save_model``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` or ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def enable_cpu_fsdp(trainer: Any) -> bool:
    """Make the FSDP plugin the launcher asked for take effect in a CPU (gloo) process group.

    Call it right after ``Trainer.create_accelerator_and_postprocess``. It does nothing (returns False) unless FSDP
    was requested and accelerate fell back to CPU data parallelism (``DistributedType.MULTI_CPU``), i.e. on machines
    without an accelerator; there, the accelerator's state becomes ``DistributedType.FSDP`` with the plugin built from
    the launcher's settings (or the Trainer's ``--fsdp``/``--fsdp_config``), exactly what accelerate does on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = trainer.accelerator
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or getattr(state, "fsdp_plugin", None) is not None:
        return False
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    if not (fsdp_requested() or plugin_args):
        return False
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on CPUs works with FSDP version 2 (`fsdp_version: 2`, `--fsdp_version 2`); version 1 needs an "
            "accelerator. See docs/training.md."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # As accelerate does at the end of AcceleratorState.__init__: a later AcceleratorState() copies PartialState's
    # distributed type over its own, which would silently turn this run back into DDP.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    # The Trainer checks this itself only when accelerate chose FSDP.
    own_checkpointing = any(
        getattr(trainer.args, name, False) for name in ("gradient_checkpointing", "activation_checkpointing")
    )
    if plugin.activation_checkpointing and own_checkpointing:
        raise ValueError(
            "`fsdp_activation_checkpointing` (FSDP's own activation checkpointing) and --gradient_checkpointing "
            "cannot both be on; use one of them."
        )
    return True


def fsdp_ram_efficient_loading() -> bool:
    """Whether transformers loads checkpoints on the ``meta`` device on every process but the main one (FSDP with
    ``fsdp_cpu_ram_efficient_loading``): accelerate then broadcasts the main process' weights when it shards."""
    import torch.distributed as dist

    flag = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes")
    return fsdp_requested() and flag and dist.is_available() and dist.is_initialized()


def materialize_meta_parameters(model: nn.Module) -> list[str]:
    """Give the parameters a model holds on the ``meta`` device uninitialised CPU storage; returns their names.

    For FSDP's ``cpu_ram_efficient_loading`` on a process other than the main one: transformers leaves the weights
    there on ``meta`` (and the new head's), but Mona is only placed on blocks with real weights (a block on ``meta``
    with no accelerate hook is refused). The values do not matter: when the Trainer prepares the model, accelerate
    moves it back to ``meta``, shards it and fills every parameter (Mona's and the head's too) with the main process'
    values by broadcast. Buffers are real already (transformers does not put them on ``meta``) and are left alone.
    Untouched storage is not resident memory, so the saving in memory is kept.
    """
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            empty = torch.empty(param.shape, dtype=param.dtype, device="cpu")
            setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
            names.append(f"{module_name}.{name}".lstrip("."))
    return names


def set_default_wrap_classes(trainer: Any) -> list[str] | None:
    """Fill in the block classes to shard when ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` names none.

    accelerate then wraps every class in the model's ``_no_split_modules``, which for DINOv2 includes
    ``Dinov2Embeddings``; wrapping it and then the patch embedding inside it fails in ``fully_shard`` ("Invariant
    encountered: value was None"). The default here: ``MonaLayer`` for a Mona model (one FSDP unit per block, Mona's
    weights with the block they belong to), else the ``_no_split_modules`` classes that do not hold the input
    embeddings. Returns the class names set, or None when nothing was changed.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    state = trainer.accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    model = getattr(trainer, "model", None)
    if plugin is None or model is None or plugin.transformer_cls_names_to_wrap is not None:
        return None
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return None
    from .. import MonaLayer

    if any(isinstance(module, MonaLayer) for module in model.modules()):
        names = [MonaLayer.__name__]
    else:
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        names = sorted(
            {
                type(module).__name__
                for module in model.modules()
                if type(module).__name__ in blocks and not any(sub is embeddings for sub in module.modules())
            }
        )
    if not names:
        return None
    plugin.transformer_cls_names_to_wrap = names
    return names


def describe_distributed() -> str | None:
    """How this run is distributed, for the model card: ``"FSDP2"``, ``"DDP"``, ``"DeepSpeed ZeRO-2"``; None for a
    single process. Read from accelerate's shared state, without creating or changing it."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    shared = AcceleratorState._shared_state or PartialState._shared_state
    if not shared or shared.get("num_processes", 1) < 2:
        return None
    kind = shared.get("distributed_type")
    if kind == DistributedType.FSDP:
        return f"FSDP{getattr(shared.get('fsdp_plugin'), 'fsdp_version', 1)}"
    if kind == DistributedType.DEEPSPEED:
        stage = getattr(shared.get("deepspeed_plugin"), "zero_stage", None)
        return "DeepSpeed" + (f" ZeRO-{stage}" if stage is not None else "")
    return "DDP"


def end_process_group() -> bool:
    """Destroy the default process group of a launched multi-process run (``torchrun``, ``accelerate launch``) once
    its work is done, as torch asks before a process exits; True if one was destroyed. Left to interpreter shutdown,
    its teardown is unordered: a CI run once saw the second of two gloo processes abort there ("terminate called
    without an active exception") after it had finished. A group that a single process set up itself is left alone."""
    import torch.distributed as dist

    from .arguments import _launched_processes

    if _launched_processes() < 2 or not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of what ``model.save_pretrained`` saves for a PEFT model, on the CPU, keyed as in
    ``model.state_dict()``.

    Collective: every process must call it (each gathers the shards of the same tensors in the same order); the
    result is the same on all of them. Only the adapter's tensors are gathered, never the frozen backbone.
    """
    from peft.utils import get_peft_model_state_dict

    sharded = model.state_dict()  # DTensors (local shards): no communication
    wanted: set[str] = set()
    for adapter_name in model.peft_config:
        # PEFT picks the adapter's entries by name and renames them; the values are the very objects it was given.
        selected = {
            id(v) for v in get_peft_model_state_dict(model, state_dict=sharded, adapter_name=adapter_name).values()
        }
        keys = {key for key, value in sharded.items() if id(value) in selected}
        if len(keys) < len(selected):
            raise RuntimeError(
                f"Cannot match the {len(selected)} tensors PEFT saves for adapter {adapter_name!r} to the model's "
                f"state dict (found {len(keys)})."
            )
        wanted |= keys
    return {key: _full_tensor(sharded[key]) for key in sorted(wanted)}


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)
