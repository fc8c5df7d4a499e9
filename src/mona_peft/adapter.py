"""``MonaAdapter``: one Mona module (Yin et al., CVPR 2025), the adapter at one position of one block.

Read it next to the paper's figure::

    x [B, N, C] -> LN(x) * s1 + x * s2 -> down (C -> m) -> [B, m, h, w] -> mean_k dwconv_k + skip -> 1x1 proj + skip
                                                                                                        |
    delta [B, N, C] <- up (m -> C) <- dropout <- GELU <- [B, N, m] <---------------------------------------+

``forward`` returns ``delta``, the adapter's contribution: Mona's output is ``x + delta``. Returning the delta (like
LoRA's ``B(A(x))``) lets :class:`~mona_peft.layer.MonaLayer` add it where the block's residual stream needs it, route
samples of a mixed batch to different adapters and compose several adapters.

Two forms of the same computation are kept, each behind a flag:

* ``fused`` (default ``True``): the scaled norm and the down projection run as one autograd function that keeps only
  ``x`` for backward (:mod:`mona_peft.fused`); ``False`` runs plain ops, the reference.
* ``merge_filters`` (default ``True``): the averaged depthwise convs and their skip run as one merged depthwise conv
  (:mod:`mona_peft.filters`); ``False`` runs the separate convs, the reference.

Both are exact up to float rounding and are runtime choices, not part of a saved adapter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .filters import merged_filter, reference_filter
from .fused import scaled_norm_down
from .tokens import TokenLayout

PrefixTokens = Literal["tokenwise", "unchanged"]
InitWeights = bool | Literal["official"]


class MonaAdapter(nn.Module):
    """One Mona: scaled LayerNorm, down projection, multi-cognitive depthwise filter, projector, GELU, up projection.

    Args:
        channels: width ``C`` of the residual stream it adapts.
        bottleneck_dim: width ``m`` of the bottleneck.
        kernel_sizes: odd depthwise kernel sizes whose outputs are averaged.
        dropout: dropout probability after the GELU.
        prefix_tokens: ``"tokenwise"``: tokens before the grid (CLS, registers) go through every token-wise part;
            ``"unchanged"``: their delta is zero. The spatial filter never sees them.
        init_weights: ``True``: the official init with a zero up projection (output unchanged at init);
            ``"official"`` or ``False``: the official near-identity init.
        device, dtype: factory arguments for the parameters.
    """

    def __init__(
        self,
        channels: int,
        bottleneck_dim: int = 64,
        kernel_sizes: tuple[int, ...] = (3, 5, 7),
        dropout: float = 0.1,
        prefix_tokens: PrefixTokens = "tokenwise",
        init_weights: InitWeights = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        m = bottleneck_dim
        self.kernel_sizes = tuple(kernel_sizes)
        self.prefix_tokens = prefix_tokens
        self.dropout = dropout
        self.fused = True
        self.merge_filters = True

        self.norm = nn.LayerNorm(channels, **factory)
        self.scale_norm = nn.Parameter(torch.empty(channels, **factory))  # s1, per channel
        self.scale_skip = nn.Parameter(torch.empty(channels, **factory))  # s2, per channel
        self.down = nn.Linear(channels, m, **factory)
        for k in self.kernel_sizes:  # depthwise, same padding: conv3, conv5, conv7
            self.add_module(f"conv{k}", nn.Conv2d(m, m, k, padding=k // 2, groups=m, **factory))
        self.proj = nn.Conv2d(m, m, 1, **factory)  # the projector, a dense 1x1 conv with its own skip
        self.up = nn.Linear(m, channels, **factory)
        self.reset_parameters(init_weights)

    @property
    def convs(self) -> list[nn.Conv2d]:
        """The depthwise convs, in ``kernel_sizes`` order."""
        return [getattr(self, f"conv{k}") for k in self.kernel_sizes]

    @torch.no_grad()
    def reset_parameters(self, init_weights: InitWeights = True) -> None:
        """The official init (truncated-normal linears, zero biases, default convs, s1 = 1e-6, s2 = 1); with
        ``init_weights=True`` the up projection's weight is zero too, so the adapter starts as the identity."""
        self.norm.reset_parameters()
        self.scale_norm.fill_(1e-6)
        self.scale_skip.fill_(1.0)
        for conv in (*self.convs, self.proj):
            conv.reset_parameters()
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if init_weights is True:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | TokenLayout, num_prefix: int = 0) -> torch.Tensor:
        """``mona(x) - x``.

        With ``grid = (h, w)``: ``x`` is [B, N, C] with ``N = num_prefix + h * w`` tokens (prefix tokens first, then
        the patch tokens in row-major order). With a :class:`~mona_peft.tokens.TokenLayout` (SAM's [B, H, W, C],
        SigLIP2's padded images, Qwen2-VL's packed images) the layout says where the image tokens are. Runs in
        ``x``'s dtype: the weights are cast on the fly, so bfloat16/float16 activations are not upcast."""
        channels = x.shape[-1]
        if isinstance(grid, TokenLayout):
            grid.check(x, "Mona")
        else:
            height, width = grid
            if x.dim() != 3 or x.shape[1] != num_prefix + height * width:
                raise ValueError(
                    f"Mona got tokens of shape {tuple(x.shape)} but a {height}x{width} grid with {num_prefix} prefix "
                    "token(s); the grid does not belong to this input."
                )
        dtype = x.dtype

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if t.dtype == dtype else t.to(dtype)

        norm, down = self.norm, self.down
        if self.fused:  # keeps only x for backward (see fused.py)
            h = scaled_norm_down(
                x,
                cast(norm.weight),
                cast(norm.bias),
                cast(self.scale_norm),
                cast(self.scale_skip),
                cast(down.weight),
                cast(down.bias),
                norm.eps,
            )
        else:
            scaled = F.layer_norm(x, (channels,), cast(norm.weight), cast(norm.bias), norm.eps)
            scaled = scaled * cast(self.scale_norm) + x * cast(self.scale_skip)
            h = F.linear(scaled, cast(down.weight), cast(down.bias))  # [B, N, m]

        weights = [cast(conv.weight) for conv in self.convs]
        biases = [cast(conv.bias) for conv in self.convs]
        method = merged_filter if self.merge_filters else reference_filter

        def spatial(image: torch.Tensor) -> torch.Tensor:  # [b, m, H, W] -> [b, m, H, W]
            return method(image, weights, biases)

        if isinstance(grid, TokenLayout):
            h = grid.filter(h, spatial)
        else:
            # Spatial filter over the patch tokens only: [B, h*w, m] -> [B, m, h, w] (row-major token order) and
            # back; both ways are views (the conv gets a channels-last layout). One split: its backward is one cat.
            prefix, patches = h.split([num_prefix, height * width], dim=1)
            image = spatial(patches.transpose(1, 2).reshape(x.shape[0], -1, height, width))
            patches = image.flatten(2).transpose(1, 2)
            h = torch.cat([prefix, patches], dim=1) if num_prefix else patches

        # Projector with its skip, z + (W z + b) = (W + I) z + b: one linear map on the tokens.
        weight = cast(self.proj.weight).flatten(1)
        weight = weight + torch.eye(weight.shape[0], dtype=dtype, device=weight.device)
        h = F.linear(h, weight, cast(self.proj.bias))
        h = F.dropout(F.gelu(h), self.dropout, self.training)
        delta = F.linear(h, cast(self.up.weight), cast(self.up.bias))
        if num_prefix and self.prefix_tokens == "unchanged":
            delta = torch.cat([delta.new_zeros(x.shape[0], num_prefix, channels), delta[:, num_prefix:]], dim=1)
        return delta

    def extra_repr(self) -> str:
        return (
            f"kernel_sizes={self.kernel_sizes}, dropout={self.dropout}, prefix_tokens={self.prefix_tokens!r}, "
            f"fused={self.fused}, merge_filters={self.merge_filters}"
        )
