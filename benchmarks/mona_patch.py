"""A prototype of a faster ``MonaLayer.mona_delta``, monkeypatched in for the benchmarks (src/ is not changed here).

Same maths as the original (results equal up to float rounding), fewer passes over the wide [B, N, C] tensors, which
is where the profile (docs/profile.md) shows Mona's time and memory go:

1. **Scaled norm + down projection as one autograd function** (:class:`ScaledNormDown`). Forward:
   ``layer_norm`` with ``s1`` folded into its affine (``weight * s1``, ``bias * s1``, size-C vectors), one in-place
   ``addcmul`` for ``+ x * s2``, the down matmul. Backward saves only ``x`` (alive anyway: it is the residual stream)
   and the per-token mean and 1/std; every weight gradient is computed from ``x`` with one [2m, BN] x [BN, C]
   matmul and C x m work, and the input gradient with LayerNorm's own backward kernel. The original keeps three
   [B, N, C] tensors per Mona for backward (x, LN(x) and the down-projection's input) and, besides LayerNorm's
   backward, runs four full-size multiplies, two full-size reductions and an add; this keeps one and runs one
   ``addcmul``.
2. **One split instead of two slices.** ``h.split([prefix, h*w])`` returns both views at once; its backward is a
   single ``cat`` instead of two zero-filled ``slice_backward`` buffers summed together.
3. **Projector skip folded into the 1x1 weight.** ``z + W z + b == (W + I) z + b``: one linear, no extra add.

(Caching the merged kernel in eval mode was tried and dropped: keyed on version counters it goes stale when weights
are updated through ``.data``, which failed the project's resume test, and the merge is under 1% of a module.)

The same change as a patch of ``src/``: ``benchmarks/proposed_mona_delta.diff``.

``install()`` replaces ``MonaLayer.mona_delta`` in the current process; ``uninstall()`` restores it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mona_peft.filters import merged_filter, reference_filter
from mona_peft.layer import MonaLayer, conv_part

_ORIGINAL = MonaLayer.mona_delta


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
        w1, b1 = gamma * s1, beta * s1
        h, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), w1, b1, eps)
        h.addcmul_(x, s2)
        ctx.save_for_backward(x, mean, rstd, gamma, beta, s1, s2, weight)
        return F.linear(h, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, gamma, beta, s1, s2, weight = ctx.saved_tensors
        channels, m = x.shape[-1], weight.shape[0]
        w1, b1 = gamma * s1, beta * s1
        g = grad.reshape(-1, m)
        x2 = x.reshape(-1, channels)
        r = rstd.reshape(-1, 1)
        need = ctx.needs_input_grad
        grad_x = grad_gamma = grad_beta = grad_s1 = grad_s2 = grad_weight = grad_bias = None
        if any(need[1:7]):
            # one matmul gives both (g * rstd)^T x and g^T x: [2m, C]
            gx_r, gx = (torch.cat([g * r, g], dim=1).t() @ x2).split(m, dim=0)
            centred = gx_r - (g * (r * mean.reshape(-1, 1))).sum(0)[:, None]  # (g * rstd)^T xh, [m, C]
            g_sum = g.sum(0)
            if need[5]:
                grad_weight = centred * w1 + g_sum[:, None] * b1 + gx * s2
            if need[6]:
                grad_bias = g_sum
            grad_w1 = (weight * centred).sum(0)  # sum_n dh * xh
            grad_b1 = weight.t() @ g_sum  # sum_n dh
            grad_s2 = (weight * gx).sum(0) if need[4] else None  # sum_n dh * x
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


def patched_mona_delta(
    self: MonaLayer, adapter_name: str, position: str, x: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Drop-in replacement of :meth:`MonaLayer.mona_delta` (same signature, same result up to rounding)."""
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

    # down(LN(x) * s1 + x * s2) without keeping any [B, N, C] activation but x itself.
    norm, down = p["norm"], p["down"]
    h = ScaledNormDown.apply(
        x,
        w(norm.weight),
        w(norm.bias),
        w(p["scale_norm"]),
        w(p["scale_skip"]),
        w(down.weight),
        w(down.bias),
        norm.eps,
    )  # [B, N, m]

    # Spatial filter over the patch tokens: [B, h*w, m] -> [B, m, h, w] is a channels-last view, no copy.
    prefix, patches = h.split([num_prefix, height * width], dim=1)
    image = patches.transpose(1, 2).reshape(batch, -1, height, width)
    convs = [p[conv_part(k)] for k in settings.kernel_sizes]
    weights, biases = [w(c.weight) for c in convs], [w(c.bias) for c in convs]
    image = (merged_filter if settings.merge_filters else reference_filter)(image, weights, biases)
    patches = image.flatten(2).transpose(1, 2)
    h = torch.cat([prefix, patches], dim=1) if num_prefix else patches

    # Projector with its skip: z + (W z + b) == (W + I) z + b.
    proj = p["proj"]
    weight = w(proj.weight).flatten(1)
    weight = weight + torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    h = F.linear(h, weight, w(proj.bias))
    h = F.dropout(F.gelu(h), settings.dropout, self.training)
    delta = F.linear(h, w(p["up"].weight), w(p["up"].bias))
    if num_prefix and settings.prefix_tokens == "unchanged":
        delta = torch.cat([delta.new_zeros(batch, num_prefix, channels), delta[:, num_prefix:]], dim=1)
    return delta


def install() -> None:
    """Use :func:`patched_mona_delta` for every MonaLayer in this process."""
    MonaLayer.mona_delta = patched_mona_delta


def uninstall() -> None:
    """Restore the original ``MonaLayer.mona_delta``."""
    MonaLayer.mona_delta = _ORIGINAL


def is_installed() -> bool:
    return MonaLayer.mona_delta is patched_mona_delta


def original_mona_delta(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The unpatched ``MonaLayer.mona_delta`` (for side-by-side comparisons)."""
    return _ORIGINAL(*args, **kwargs)
