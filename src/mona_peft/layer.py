"""The Mona tuner layer: wraps one transformer block and adds Mona on its residual stream with ordinary hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .adapter import MonaAdapter
from .config import MonaConfig
from .families import BlockLayout, block_hidden_width
from .grid import CallSlot, GridTracker, keep_call_in_checkpoint, release_checkpoint
from .tokens import TokenLayout, TokenMap

# Each position's adapters live in one ModuleDict of the layer, keyed by adapter name.
POSITION_CONTAINERS = {"attention": "mona_attn", "mlp": "mona_mlp"}


def block_hidden_size(block: nn.Module) -> int:
    """Width of a transformer block's residual stream (the size of its first LayerNorm or RMSNorm)."""
    return block_hidden_width(block)


def execution_device(block: nn.Module) -> torch.device | None:
    """Where ``block`` computes: accelerate's execution device if a big-model hook is attached (its weights may be
    offloaded to ``meta`` between calls), else the device of its first parameter that is not on ``meta``."""
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for inner in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
            device = getattr(inner, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for param in block.parameters():
        if param.device.type != "meta":
            return param.device
    return None


@dataclass
class MonaCall:
    """One call of one Mona layer: what its hooks need while the block runs."""

    grid: tuple[int, int] | TokenLayout | None
    # Mixed batch: (adapter name, sample indices) per adapter; otherwise None and ``adapters`` apply to every sample.
    adapters: tuple[str, ...] = ()
    groups: tuple[tuple[str, torch.Tensor], ...] | None = None
    # mona_attn(x1) - x1, set by the entry hook and consumed by the join hook.
    pending: torch.Tensor | None = field(default=None, repr=False)


class MonaLayer(nn.Module, BaseTunerLayer):
    """A transformer block with Mona adapters on its residual stream.

    The block stays intact as ``base_layer``. Per adapter there is one :class:`~mona_peft.adapter.MonaAdapter` per
    position: ``mona_attn[name]`` right after the attention residual add, ``mona_mlp[name]`` right after the MLP
    residual add. They are applied by three ordinary PyTorch hooks that this layer registers and removes (see
    :mod:`mona_peft.families`): a pre-hook on the module that first reads the post-attention stream, a forward hook on
    the module that closes the MLP branch, and a forward hook on the module producing the block's output (the block
    itself, or a sub-module that adds the MLP residual). The hooks act only while this layer's
    ``forward`` runs, so the block called on its own, or with adapters disabled, is exactly the original block.
    """

    adapter_layer_names: tuple[str, ...] = tuple(POSITION_CONTAINERS.values())
    other_param_names: tuple[str, ...] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MonaConfig,
        layout: BlockLayout,
        grid_tracker: GridTracker | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.grid_tracker = grid_tracker
        self.hidden_size = block_hidden_size(base_layer)
        self.in_features = self.out_features = self.hidden_size
        self.mona_attn = nn.ModuleDict()
        self.mona_mlp = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._call = CallSlot(f"mona_call_{id(self)}")

        entry_name, join_name, output_name = layout.resolve(base_layer)
        self._hook_handles = [
            getattr(base_layer, entry_name).register_forward_pre_hook(self._entry_hook),
            getattr(base_layer, join_name).register_forward_hook(self._join_hook),
            # after the join hook when both sit on the same module; on the block: prepend, to run before anything
            # else observes the block's output (transformers' hidden-state capture)
            getattr(base_layer, output_name).register_forward_hook(self._output_hook)
            if output_name is not None
            else base_layer.register_forward_hook(self._output_hook, prepend=True),
        ]
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ----------------------------------------------------------------------------------------------- adapter state
    def update_layer(self, adapter_name: str, config: MonaConfig, **kwargs: Any) -> None:
        """Create (or replace) the adapters of ``adapter_name`` from ``config``, on the block's execution device."""
        for position, container in POSITION_CONTAINERS.items():
            adapters = getattr(self, container)
            if position not in config.positions:
                if adapter_name in adapters:
                    del adapters[adapter_name]
                continue
            adapters[adapter_name] = MonaAdapter(
                self.hidden_size,
                bottleneck_dim=config.bottleneck_dim,
                kernel_sizes=config.kernel_sizes,
                dropout=config.dropout,
                prefix_tokens=config.prefix_tokens,
                init_weights=config.init_weights,
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapters_of(self, adapter_name: str) -> dict[str, MonaAdapter]:
        """The adapter modules of ``adapter_name`` in this layer, by position (``"attention"``, ``"mlp"``)."""
        return {
            position: getattr(self, container)[adapter_name]
            for position, container in POSITION_CONTAINERS.items()
            if adapter_name in getattr(self, container)
        }

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # A block has no `.weight`, and under accelerate's big-model dispatch its weights sit on `meta` between calls:
        # place the adapter where the block computes, not on `meta`.
        target = device if device is not None else execution_device(self.base_layer)
        if target is None:  # a skeleton on `meta` with no hook (e.g. built to count parameters): stay alike
            target = torch.device("meta")
        dtype = next((p.dtype for p in self.base_layer.parameters() if p.is_floating_point()), None)
        for adapter in self.adapters_of(adapter_name).values():
            if target.type != "meta" and any(p.device.type == "meta" for p in adapter.parameters()):
                continue  # low_cpu_mem_usage: the weights arrive later, with load_state_dict(assign=True)
            adapter.to(device=target, dtype=dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(MERGE_ERROR)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Any) -> nn.Module:
        """Called by PEFT's ``unload()``: give back the original block (merging is impossible for Mona)."""
        if merge:
            raise ValueError(MERGE_ERROR)
        return self.release()

    def release(self) -> nn.Module:
        """Detach Mona from the block (remove its hooks) and return the original block."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        release_checkpoint(self.base_layer)
        return self.base_layer

    # ------------------------------------------------------------------------------------------------------ compute
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if adapter_names is None:
            adapters = tuple(a for a in self.active_adapters if a in self.mona_attn or a in self.mona_mlp)
            if not adapters:
                return self.base_layer(*args, **kwargs)
            call = MonaCall(grid=self._grid(args, kwargs), adapters=adapters)
        else:
            call = MonaCall(grid=self._grid(args, kwargs), groups=self._groups(adapter_names, args[0].device))
        keep_call_in_checkpoint(self.base_layer, self._call)
        if (
            args
            and getattr(self.base_layer, "gradient_checkpointing", False)
            and self.training
            and torch.is_grad_enabled()
            and not args[0].requires_grad
        ):
            # Reentrant checkpointing only back-propagates into a block whose input requires grad; below a frozen
            # stem it does not, and Mona's weights inside the block would silently get no gradient.
            args = (args[0].detach().requires_grad_(True), *args[1:])
        token = self._call.set(call)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            self._call.reset(token)

    def _groups(self, adapter_names: list[str], device: torch.device) -> tuple[tuple[str, torch.Tensor], ...]:
        """Sample indices per adapter of a mixed batch (``"__base__"`` and adapters absent here get no Mona)."""
        groups = []
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or not self.adapters_of(name):
                continue
            index = [i for i, n in enumerate(adapter_names) if n == name]
            groups.append((name, torch.tensor(index, device=device)))
        return tuple(groups)

    def _delta(self, call: MonaCall, position: str, x: torch.Tensor) -> torch.Tensor | None:
        """What the adapters at ``position`` add to ``x`` [B, N, C], or None when none applies."""
        adapters = getattr(self, POSITION_CONTAINERS[position])
        grid = call.grid
        if isinstance(grid, TokenLayout):
            grid.check(x, f"Mona in {type(self.base_layer).__name__}")
            num_prefix = 0
        else:
            height, width = grid
            num_prefix = x.shape[1] - height * width if x.dim() == 3 else -1
            if num_prefix < 0 or (num_prefix > 0 and self.layout.grid_source != "patch_grid"):
                raise ValueError(
                    f"Mona got tokens of shape {tuple(x.shape)} in {type(self.base_layer).__name__} but a "
                    f"{height}x{width} token grid; the block was called with a grid that does not belong to its input."
                )
        if call.groups is None:
            # Several active adapters compose: each one sees the stream as the previous ones left it.
            total = None
            for name in call.adapters:
                if name in adapters:
                    delta = adapters[name](x if total is None else x + total, grid, num_prefix)
                    total = delta if total is None else total + delta
            return total
        total = None
        for name, index in call.groups:
            if name in adapters:
                selected = grid.select(index, index.tolist()) if isinstance(grid, TokenLayout) else grid
                delta = adapters[name](x.index_select(0, index), selected, num_prefix)
                total = (x.new_zeros(x.shape) if total is None else total).index_copy(0, index, delta)
        return total

    def _entry_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        call = self._call.get()
        if call is None:
            return None
        delta = self._delta(call, "attention", args[0])
        if delta is None:
            return None
        call.pending = delta
        return (args[0] + delta, *args[1:])

    def _join_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self._call.get()
        if call is None or call.pending is None:
            return None
        delta, call.pending = call.pending, None
        return output + delta

    def _output_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self._call.get()
        if call is None:
            return None
        if call.pending is not None:
            call.pending = None
            raise RuntimeError(
                f"Mona's post-attention adapter in {type(module).__name__} was never closed: the MLP branch module "
                f"expected by the {self.layout.family} layout did not run. This transformers version is not supported."
            )
        hidden = output[0] if isinstance(output, tuple) else output
        delta = self._delta(call, "mlp", hidden)
        if delta is None:
            return None
        hidden = hidden + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | TokenLayout:
        if self.layout.grid_source == "token_map":
            return _TOKEN_MAP
        if self.layout.grid_source == "input_dimensions":
            dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
            if dims is None:
                raise ValueError(f"{type(self.base_layer).__name__} was called without `input_dimensions`.")
            return int(dims[0]), int(dims[1])
        grid = self.grid_tracker.get(self.layout.grid_source) if self.grid_tracker is not None else None
        if grid is None:
            raise RuntimeError(
                f"Mona needs the token grid of the image, recorded when the {self.layout.family} model's "
                f"{'patch embedding' if self.layout.grid_source == 'patch_grid' else 'vision tower'} runs; call the "
                "whole model (or its vision tower) rather than the blocks on their own."
            )
        return grid

    def __repr__(self) -> str:
        return "mona." + super().__repr__()


_TOKEN_MAP = TokenMap()

MERGE_ERROR = (
    "Mona adapters cannot be merged into the base weights: Mona is non-linear (LayerNorm, GELU and a spatial filter "
    "on the token grid), so no weight update reproduces it. Keep the adapter attached, or call `unload()` to get the "
    "base model back without it."
)
