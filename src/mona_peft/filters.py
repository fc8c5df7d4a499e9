"""Mona's multi-cognitive depthwise filter, in its reference and merged forms.

The filter is ``y = mean_k(dwconv_k(x)) + x`` over stride-1, same-padded depthwise convs. A sum of same-padded
convolutions is one convolution with the zero-padded kernels summed, and the identity skip is a centred unit kernel,
so the whole filter equals a single depthwise conv with the largest kernel. Gradients reach every original kernel
through the (differentiable) merge.

On CPU, with gradients, the merged conv runs as :class:`DepthwiseConv`, whose backward computes both gradients with
forward convolutions: the filter's forward + backward runs 2.2x faster this way than with PyTorch's own depthwise
backward at ViT-B's shapes (docs/filter-backward/benchmarks.md, the filter alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


_CHUNK_BYTES = 2**21  # per operand of DepthwiseConv's kernel-gradient conv


class DepthwiseConv(torch.autograd.Function):
    """``F.conv2d(x, kernel, bias, padding=k // 2, groups=m)`` (stride 1, odd ``k``) with a backward of two convs.

    For a stride-1, same-padded depthwise conv both gradients are convolutions again::

        dx = conv(dy, flip(kernel))                      same padding, one group per channel
        dkernel[c] = sum_n conv(x[n, c], dy[n, c])       x padded by k // 2, dy as the kernel: a k x k output

    The second runs as one depthwise conv over the ``n * m`` (sample, channel) maps, summed over the samples. The
    backward is built from differentiable ops, so double backward works; ``torch.func`` transforms and forward-mode AD
    are supported too (a generated vmap rule, an explicit ``jvp``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, kernel, bias = inputs
        ctx.save_for_backward(x, kernel)
        ctx.save_for_forward(x, kernel)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(grad.device.type, enabled=False):  # also when backward runs inside an autocast region
            return DepthwiseConv._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, kernel = ctx.saved_tensors
        _, channels, height, width = x.shape
        size = kernel.shape[-1]
        grad_x = grad_kernel = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, kernel.flip((-2, -1)), padding=size // 2, groups=channels)
        if ctx.needs_input_grad[1]:
            # In chunks of samples of about _CHUNK_BYTES each, to keep the grouped conv's operands in the cache (the
            # size was chosen from a one-off CPU measurement over 7x7 to 64x64 maps, not kept as a benchmark).
            step = max(1, _CHUNK_BYTES // (channels * height * width * x.element_size()))
            grad_kernel = kernel.new_zeros(kernel.shape)
            for xs, gs in zip(x.split(step), grad.split(step), strict=True):
                n = xs.shape[0]
                maps = xs.transpose(0, 1).reshape(1, channels * n, height, width)
                kernels = gs.transpose(0, 1).reshape(channels * n, 1, height, width)
                part = F.conv2d(maps, kernels, padding=size // 2, groups=channels * n)
                grad_kernel = grad_kernel + part.view(channels, n, 1, size, size).sum(1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_kernel, grad_bias

    @staticmethod
    def jvp(
        ctx: Any, x_t: torch.Tensor | None, kernel_t: torch.Tensor | None, bias_t: torch.Tensor | None
    ) -> torch.Tensor:
        x, kernel = ctx.saved_tensors
        padding, groups = kernel.shape[-1] // 2, x.shape[1]
        out = x.new_zeros(x.shape) if bias_t is None else bias_t[:, None, None].expand_as(x).clone()
        if x_t is not None:
            out = out + F.conv2d(x_t, kernel, padding=padding, groups=groups)
        if kernel_t is not None:
            out = out + F.conv2d(x, kernel_t, padding=padding, groups=groups)
        return out


def depthwise_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1, same-padded depthwise conv of ``x`` [B, m, H, W] with ``kernel`` [m, 1, k, k] (k odd).

    Runs as :class:`DepthwiseConv` where it is measured faster and equal to ``F.conv2d`` up to float rounding (CPU,
    float32/float64, gradients needed, no autocast, not under ``torch.compile`` / ``torch.export`` tracing, which
    keep PyTorch's own conv), otherwise as ``F.conv2d``."""
    device = x.device.type
    size = kernel.shape[-1]
    custom = (
        device == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and (x.requires_grad or kernel.requires_grad)
        and not torch.is_autocast_enabled(device)
        and not torch.compiler.is_compiling()
        and x.shape[0] > 0
        and size % 2 == 1
        and kernel.shape[-2] == size
    )
    if custom:
        return DepthwiseConv.apply(x, kernel, bias)
    return F.conv2d(x, kernel, bias, padding=size // 2, groups=x.shape[1])


def merged_filter(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Same result as :func:`reference_filter` (up to float rounding) with a single depthwise conv."""
    kernel, bias = merged_filter_params(weights, biases)
    return depthwise_conv(x, kernel, bias)
