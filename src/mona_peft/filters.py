"""Mona's multi-cognitive depthwise filter, in its reference and merged forms.

The filter is ``y = mean_k(dwconv_k(x)) + x`` over stride-1, same-padded depthwise convs. A sum of same-padded
convolutions is one convolution with the zero-padded kernels summed, and the identity skip is a centred unit kernel,
so the whole filter equals a single depthwise conv with the largest kernel. Gradients reach every original kernel
through the (differentiable) merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def reference_filter(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average of depthwise convs plus identity, one conv per kernel. ``x``: [B, m, H, W]; weights [m, 1, k, k]."""
    channels = x.shape[1]
    total = None
    for weight, bias in zip(weights, biases, strict=True):
        out = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=channels)
        total = out if total is None else total + out
    return total / len(weights) + x


def merged_filter_params(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One depthwise kernel [m, 1, K, K] (K = largest k) and bias equal to ``reference_filter``'s whole map."""
    size = max(w.shape[-1] for w in weights)
    kernel = None
    for weight in weights:
        pad = (size - weight.shape[-1]) // 2
        padded = F.pad(weight, (pad, pad, pad, pad))
        kernel = padded if kernel is None else kernel + padded
    kernel = kernel / len(weights)
    centre = size // 2
    identity = torch.zeros_like(kernel)
    identity[:, :, centre, centre] = 1
    bias = torch.stack(list(biases)).mean(0)
    return kernel + identity, bias


def merged_filter(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Same result as :func:`reference_filter` (up to float rounding) with a single depthwise conv."""
    kernel, bias = merged_filter_params(weights, biases)
    return F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2, groups=x.shape[1])
