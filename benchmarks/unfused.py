"""Mona's delta as it was before the fused scaled-norm + down projection, kept as the "before" of side-by-side runs.

``src/mona_peft/layer.py`` computes ``down(LN(x) * s1 + x * s2)`` with one autograd function
(:mod:`mona_peft.fused`), takes the prefix and patch tokens with one ``split`` and folds the projector's skip into its
1x1 weight. This module keeps the earlier plain-op version (the same maths; results equal up to float rounding), so
that ``benchmarks/speed.py`` (method ``mona_unfused``) and ``benchmarks/profile_mona.py`` can measure what the change
bought in the same run, and the tests can check the two agree, outputs and every gradient.

``install()`` makes every ``MonaLayer`` in this process use :func:`unfused_mona_delta`; ``uninstall()`` restores
``src``'s version.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mona_peft.filters import merged_filter, reference_filter
from mona_peft.layer import MonaLayer, conv_part

_FUSED = MonaLayer.mona_delta


def unfused_mona_delta(
    self: MonaLayer, adapter_name: str, position: str, x: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Drop-in replacement of :meth:`MonaLayer.mona_delta` written with plain ops (autograd keeps x, LN(x) and the
    down projection's input, three [B, N, C] tensors, for backward)."""
    settings = self.mona_settings[adapter_name]
    p = self._parts(adapter_name, position)
    dtype = x.dtype

    def w(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == dtype else t.to(dtype)

    batch, tokens, channels = x.shape
    height, width = grid
    num_prefix = tokens - height * width
    if num_prefix < 0 or (num_prefix > 0 and self.layout.grid_source != "patch_grid"):
        raise ValueError(f"{tokens} tokens do not fit a {height}x{width} grid in {type(self.base_layer).__name__}.")

    norm = p["norm"]
    h = F.layer_norm(x, norm.normalized_shape, w(norm.weight), w(norm.bias), norm.eps)
    h = h * w(p["scale_norm"]) + x * w(p["scale_skip"])
    h = F.linear(h, w(p["down"].weight), w(p["down"].bias))

    patches = h[:, num_prefix:]
    image = patches.transpose(1, 2).reshape(batch, -1, height, width)
    convs = [p[conv_part(k)] for k in settings.kernel_sizes]
    weights, biases = [w(c.weight) for c in convs], [w(c.bias) for c in convs]
    image = (merged_filter if settings.merge_filters else reference_filter)(image, weights, biases)
    patches = image.flatten(2).transpose(1, 2)
    h = torch.cat([h[:, :num_prefix], patches], dim=1) if num_prefix else patches

    proj = p["proj"]
    h = h + F.linear(h, w(proj.weight).flatten(1), w(proj.bias))
    h = F.dropout(F.gelu(h), settings.dropout, self.training)
    delta = F.linear(h, w(p["up"].weight), w(p["up"].bias))
    if num_prefix and settings.prefix_tokens == "unchanged":
        delta = torch.cat([delta.new_zeros(batch, num_prefix, channels), delta[:, num_prefix:]], dim=1)
    return delta


def install() -> None:
    """Use :func:`unfused_mona_delta` for every MonaLayer in this process."""
    MonaLayer.mona_delta = unfused_mona_delta


def uninstall() -> None:
    """Restore ``src``'s (fused) ``MonaLayer.mona_delta``."""
    MonaLayer.mona_delta = _FUSED


def fused_mona_delta(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``src``'s ``MonaLayer.mona_delta``, whatever is installed (for side-by-side comparisons)."""
    return _FUSED(*args, **kwargs)
