"""The Mona tuner layer: wraps one transformer block and adds two Mona modules on its residual stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MonaConfig
from .families import BlockLayout
from .filters import merged_filter, reference_filter
from .fused import scaled_norm_down
from .grid import BlockCall, PatchGridTracker, block_call, current_call, keep_call_in_checkpoint, release_checkpoint

# Short names used in parameter names: "attention" -> mona_attn_*, "mlp" -> mona_mlp_*.
_SHORT = {"attention": "attn", "mlp": "mlp"}
_PARTS = ("norm", "scale_norm", "scale_skip", "down", "proj", "up")


@dataclass(frozen=True)
class MonaSettings:
    """The per-adapter hyper-parameters a Mona layer needs at run time."""

    bottleneck_dim: int
    kernel_sizes: tuple[int, ...]
    dropout: float
    positions: tuple[str, ...]
    prefix_tokens: str
    merge_filters: bool

    @classmethod
    def from_config(cls, config: MonaConfig) -> MonaSettings:
        return cls(
            bottleneck_dim=config.bottleneck_dim,
            kernel_sizes=tuple(config.kernel_sizes),
            dropout=config.dropout,
            positions=tuple(config.positions),
            prefix_tokens=config.prefix_tokens,
            merge_filters=config.merge_filters,
        )


def container_name(position: str, part: str) -> str:
    """Attribute name of the per-adapter container of one Mona part, e.g. ``mona_attn_down``."""
    return f"mona_{_SHORT[position]}_{part}"


def conv_part(kernel_size: int) -> str:
    return f"conv{kernel_size}"


def block_hidden_size(block: nn.Module) -> int:
    """Width of a transformer block's residual stream (every supported block has a LayerNorm of that width)."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    raise TypeError(f"Cannot find the hidden size of {type(block).__name__}: it has no LayerNorm.")


class MonaLayer(nn.Module, BaseTunerLayer):
    """A transformer block with Mona modules on its residual stream.

    The wrapped block stays intact as ``base_layer``; Mona is attached with hooks on three of its modules (see
    :mod:`mona_peft.families`) which only act while this layer's ``forward`` is running, so the block called on its own
    (or with adapters disabled) is exactly the original block.

    Per-adapter weights live in flat containers named ``mona_<position>_<part>`` keyed by adapter name, e.g.
    ``mona_attn_down["default"]`` is the down-projection of the post-attention Mona.
    """

    # Filled per instance (the conv containers depend on the kernel sizes of the adapters added so far).
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("mona_settings",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MonaConfig,
        layout: BlockLayout,
        grid_tracker: PatchGridTracker | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.grid_tracker = grid_tracker
        self.hidden_size = block_hidden_size(base_layer)
        self.in_features = self.out_features = self.hidden_size
        self.mona_settings: dict[str, MonaSettings] = {}
        self.adapter_layer_names = ()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

        entry_name, join_name = layout.resolve(base_layer)
        self._hook_handles = [
            getattr(base_layer, entry_name).register_forward_pre_hook(self._entry_hook),
            getattr(base_layer, join_name).register_forward_hook(self._join_hook),
        ]
        _attach_output_mona(base_layer, self)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ----------------------------------------------------------------------------------------------- adapter state
    def _container(self, position: str, part: str, kind: type[nn.Module]) -> nn.Module:
        name = container_name(position, part)
        if not hasattr(self, name):
            setattr(self, name, kind())
            self.adapter_layer_names = (*self.adapter_layer_names, name)
        return getattr(self, name)

    def update_layer(self, adapter_name: str, config: MonaConfig, **kwargs: Any) -> None:
        """Create (or replace) the weights of ``adapter_name`` from ``config`` and place them on the block's device."""
        settings = MonaSettings.from_config(config)
        channels, bottleneck = self.hidden_size, settings.bottleneck_dim
        for position in settings.positions:
            self._container(position, "norm", nn.ModuleDict)[adapter_name] = nn.LayerNorm(channels)
            self._container(position, "scale_norm", nn.ParameterDict)[adapter_name] = nn.Parameter(
                torch.full((channels,), 1e-6)
            )
            self._container(position, "scale_skip", nn.ParameterDict)[adapter_name] = nn.Parameter(
                torch.ones(channels)
            )
            self._container(position, "down", nn.ModuleDict)[adapter_name] = nn.Linear(channels, bottleneck)
            for k in settings.kernel_sizes:
                self._container(position, conv_part(k), nn.ModuleDict)[adapter_name] = nn.Conv2d(
                    bottleneck, bottleneck, k, padding=k // 2, groups=bottleneck
                )
            self._container(position, "proj", nn.ModuleDict)[adapter_name] = nn.Conv2d(bottleneck, bottleneck, 1)
            self._container(position, "up", nn.ModuleDict)[adapter_name] = nn.Linear(bottleneck, channels)
        self.mona_settings[adapter_name] = settings
        self.reset_mona_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_mona_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """Initialise one adapter: the official init, with a zero up-projection when ``init_weights`` is True."""
        settings = self.mona_settings[adapter_name]
        for position in settings.positions:
            for part in ("down", "up"):
                linear = getattr(self, container_name(position, part))[adapter_name]
                nn.init.trunc_normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            if init_weights is True:
                up = getattr(self, container_name(position, "up"))[adapter_name]
                nn.init.zeros_(up.weight)
            # Convs keep PyTorch's default init, LayerNorm starts at (1, 0), s1 = 1e-6 and s2 = 1 (set on creation).

    def _parts(self, adapter_name: str, position: str) -> dict[str, Any]:
        return {
            part: getattr(self, container_name(position, part))[adapter_name]
            for part in (*_PARTS, *(conv_part(k) for k in self.mona_settings[adapter_name].kernel_sizes))
        }

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, Any]:
        # A block has no `.weight`; take its first floating-point parameter.
        for param in base_layer.parameters():
            if param.is_floating_point():
                return param.device, param.dtype
        return None, None

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
        _detach_output_mona(self.base_layer)
        release_checkpoint(self.base_layer)
        return self.base_layer

    # ------------------------------------------------------------------------------------------------------ compute
    def mona_delta(self, adapter_name: str, position: str, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``mona(x) - x`` for one adapter's Mona at ``position``; ``x`` is [B, N, C] with N = prefix + h * w.

        Runs in ``x``'s dtype (adapter weights are cast on the fly, so bf16/fp16 activations are not upcast).
        """
        settings = self.mona_settings[adapter_name]
        p = self._parts(adapter_name, position)
        dtype = x.dtype

        def w(t: torch.Tensor) -> torch.Tensor:
            return t if t.dtype == dtype else t.to(dtype)

        batch, tokens, channels = x.shape
        height, width = grid
        num_prefix = tokens - height * width
        if num_prefix < 0 or (num_prefix > 0 and self.layout.grid_source != "patch_grid"):
            raise ValueError(
                f"Mona got {tokens} tokens in {type(self.base_layer).__name__} but a {height}x{width} token grid; "
                "the block was called with a grid that does not belong to its input."
            )

        # down(LN(x) * s1 + x * s2), keeping no [B, N, C] activation but x itself for backward (see fused.py).
        norm, down = p["norm"], p["down"]
        h = scaled_norm_down(
            x,
            w(norm.weight),
            w(norm.bias),
            w(p["scale_norm"]),
            w(p["scale_skip"]),
            w(down.weight),
            w(down.bias),
            norm.eps,
        )  # [B, N, m]

        # Spatial filter over the patch tokens only: [B, h*w, m] -> [B, m, h, w] (row-major token order) and back;
        # both ways are views (the conv gets a channels-last layout). One split: its backward is a single cat.
        prefix, patches = h.split([num_prefix, height * width], dim=1)
        image = patches.transpose(1, 2).reshape(batch, -1, height, width)
        convs = [p[conv_part(k)] for k in settings.kernel_sizes]
        weights, biases = [w(c.weight) for c in convs], [w(c.bias) for c in convs]
        image = (merged_filter if settings.merge_filters else reference_filter)(image, weights, biases)
        patches = image.flatten(2).transpose(1, 2)
        h = torch.cat([prefix, patches], dim=1) if num_prefix else patches

        # Projector: a dense 1x1 conv with its own skip, z + (W z + b) = (W + I) z + b: one Linear on the tokens.
        proj = p["proj"]
        weight = w(proj.weight).flatten(1)
        weight = weight + torch.eye(weight.shape[0], dtype=dtype, device=weight.device)
        h = F.linear(h, weight, w(proj.bias))
        h = F.dropout(F.gelu(h), settings.dropout, self.training)
        delta = F.linear(h, w(p["up"].weight), w(p["up"].bias))
        if num_prefix and settings.prefix_tokens == "unchanged":
            delta = torch.cat([delta.new_zeros(batch, num_prefix, channels), delta[:, num_prefix:]], dim=1)
        return delta

    def _position_delta(self, call: BlockCall, position: str, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the deltas of all active adapters at ``position``, applied one after the other."""
        total = None
        for adapter_name in call.adapters:
            if position not in self.mona_settings[adapter_name].positions:
                continue
            current = x if total is None else x + total
            delta = self.mona_delta(adapter_name, position, current, call.grid)
            total = delta if total is None else total + delta
        return total

    def _own_call(self) -> BlockCall | None:
        call = current_call()
        return call if call is not None and call.layer is self else None

    def _entry_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        call = self._own_call()
        if call is None:
            return None
        delta = self._position_delta(call, "attention", args[0])
        if delta is None:
            return None
        call.pending = delta
        return (args[0] + delta, *args[1:])

    def _join_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self._own_call()
        if call is None or call.pending is None:
            return None
        delta, call.pending = call.pending, None
        return output + delta

    def _output_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self._own_call()
        if call is None:
            return None
        if call.pending is not None:
            call.pending = None
            raise RuntimeError(
                f"Mona's post-attention module in {type(module).__name__} was never closed: the MLP branch module "
                f"expected by the {self.layout.family} layout did not run. This transformers version is not supported."
            )
        hidden = output[0] if isinstance(output, tuple) else output
        delta = self._position_delta(call, "mlp", hidden)
        if delta is None:
            return None
        hidden = hidden + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        if self.layout.grid_source == "input_dimensions":
            dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
            if dims is None:
                raise ValueError(f"{type(self.base_layer).__name__} was called without `input_dimensions`.")
            return int(dims[0]), int(dims[1])
        grid = self.grid_tracker.get() if self.grid_tracker is not None else None
        if grid is None:
            raise RuntimeError(
                "Mona needs the patch grid of the image, recorded when the model's patch embedding runs; call the "
                "whole model (or its backbone) rather than the blocks on their own."
            )
        return grid

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = tuple(a for a in self.active_adapters if a in self.mona_settings)
        if self.disable_adapters or not adapters:
            return self.base_layer(*args, **kwargs)
        call = BlockCall(layer=self, grid=self._grid(args, kwargs), adapters=adapters)
        keep_call_in_checkpoint(self.base_layer)
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
        with block_call(call):
            return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        return "mona." + super().__repr__()


class _ForwardWithMona:
    """Instance-level ``forward`` of a wrapped block: the class's forward, then the post-MLP Mona.

    The second Mona runs *inside* ``forward`` (not in a forward hook) so that everything transformers records from
    the block (``output_hidden_states`` hooks in 5.x, the forward wrappers of 4.x) sees Mona's output, and so that
    checkpointing that wraps ``__call__`` (4.x) replays it. The class forward keeps 5.x's checkpointing wrapper.
    A small object rather than a closure, so that ``copy.deepcopy`` and pickling follow the block it belongs to.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        output = type(block).forward(block, *args, **kwargs)
        layer = block.__dict__.get("_mona_layer")
        if layer is None:
            return output
        changed = layer._output_hook(block, args, output)
        return output if changed is None else changed


def _attach_output_mona(block: nn.Module, layer: MonaLayer) -> None:
    # object.__setattr__: keep the layer out of the block's sub-modules (it would make a cycle in the module tree).
    object.__setattr__(block, "_mona_layer", layer)
    object.__setattr__(block, "forward", _ForwardWithMona(block))


def _detach_output_mona(block: nn.Module) -> None:
    block.__dict__.pop("_mona_layer", None)
    block.__dict__.pop("forward", None)


MERGE_ERROR = (
    "Mona adapters cannot be merged into the base weights: Mona is non-linear (LayerNorm, GELU and a spatial filter "
    "on the token grid), so no weight update reproduces it. Keep the adapter attached, or call `unload()` to get the "
    "base model back without it."
)
