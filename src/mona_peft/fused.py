"""Mona's scaled norm and down projection as one autograd function that keeps no full-width activation.

``down(LN(x) * s1 + x * s2)`` written with plain ops makes autograd keep three [B, N, C] tensors per Mona for the
backward pass (``x``, ``LN(x)`` for the gradient of ``s1`` and the down projection's input for the gradient of its
weight) and, besides LayerNorm's backward, run four full-width multiplies, two full-width reductions and an add in
backward. Here backward keeps only ``x`` (the residual
stream, which the rest of the block keeps anyway) and the per-token mean and 1/std, computes every weight gradient
from ``x`` with one [2m, BN] x [BN, C] matmul plus C x m work, and the input gradient with LayerNorm's own backward
kernel. Same maths, equal up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class ScaledNormDown(torch.autograd.Function):
    """``linear(LN(x) * s1 + x * s2, W, b)`` over the last dim; keeps only ``x``, mean and 1/std for backward.

    With ``xh = (x - mean) * rstd`` the normalised input, ``w1 = gamma * s1``, ``b1 = beta * s1``, ``g`` the output
    gradient flattened to [BN, m] and ``A = g^T xh = (g * rstd)^T x - (g * rstd * mean)^T 1`` (an [m, C] matrix
    computed from ``x``, so ``xh`` is never stored), the gradients are::

        dW  = A * w1 + (g^T 1) b1^T + (g^T x) * s2         db  = g^T 1
        dw1 = sum_j W * A     db1 = W^T (g^T 1)     ds2 = sum_j W * (g^T x)     (then dgamma, dbeta, ds1 from w1, b1)
        dx  = layer_norm_backward(g W; weight w1) + (g W) * s2
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        # Autocast is handled by hand: the norm runs in x's dtype (as autocast runs LayerNorm in float32) and only the
        # matmul in the autocast dtype, which the backward below can then rely on.
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            w1, b1 = gamma * s1, beta * s1
            h, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), w1, b1, eps)
            h.addcmul_(x, s2)
            ctx.save_for_backward(x, mean, rstd, gamma, beta, s1, s2, weight)
            if low is not None and low != h.dtype and h.is_floating_point():
                return F.linear(h.to(low), weight.to(low), None if bias is None else bias.to(low))
            return F.linear(h, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(grad.device.type, enabled=False):  # also when backward is called inside autocast
            return ScaledNormDown._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, gamma, beta, s1, s2, weight = ctx.saved_tensors
        channels, m = x.shape[-1], weight.shape[0]
        # Under autocast the forward's matmul ran in a lower precision, so the incoming gradient may be, say, bfloat16
        # while x and the weights are float32: compute backward in x's dtype (the weights' dtype, see MonaLayer).
        grad = grad.to(x.dtype)
        w1, b1 = gamma * s1, beta * s1
        g = grad.reshape(-1, m)
        need = ctx.needs_input_grad
        grad_x = grad_gamma = grad_beta = grad_s1 = grad_s2 = grad_weight = grad_bias = None
        if any(need[1:7]):
            r = rstd.to(x.dtype).reshape(-1, 1)
            # one matmul gives (g * rstd)^T x and g^T x: [2m, C]
            gx_r, gx = (torch.cat([g * r, g], dim=1).t() @ x.reshape(-1, channels)).split(m, dim=0)
            centred = gx_r - (g * (r * mean.to(x.dtype).reshape(-1, 1))).sum(0)[:, None]  # g^T xh
            g_sum = g.sum(0)
            if need[5]:
                grad_weight = centred * w1 + g_sum[:, None] * b1 + gx * s2
            if need[6]:
                grad_bias = g_sum
            grad_w1 = (weight * centred).sum(0)
            grad_b1 = weight.t() @ g_sum
            grad_s2 = (weight * gx).sum(0) if need[4] else None
            grad_gamma = grad_w1 * s1 if need[1] else None
            grad_beta = grad_b1 * s1 if need[2] else None
            grad_s1 = grad_w1 * gamma + grad_b1 * beta if need[3] else None
        if need[0]:
            dh = grad @ weight  # [B, N, C]
            grad_x = torch.ops.aten.native_layer_norm_backward(
                dh, x, [channels], mean, rstd, w1, None, [True, False, False]
            )[0]
            grad_x.addcmul_(dh, s2)
        return grad_x, grad_gamma, grad_beta, grad_s1, grad_s2, grad_weight, grad_bias, None


def scaled_norm_down(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    scale_norm: torch.Tensor,
    scale_skip: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``F.linear(F.layer_norm(x) * scale_norm + x * scale_skip, weight, bias)``, LayerNorm over the last dim."""
    return ScaledNormDown.apply(x, norm_weight, norm_bias, scale_norm, scale_skip, weight, bias, eps)
