"""The fused scaled norm + down projection (``mona_peft.fused``) and ``MonaAdapter`` built on it compute what the
plain-op reference path of the same module computes (``adapter.fused = False``): outputs, the input gradient and all 16
parameter gradients in float64; gradcheck of the autograd function; autocast; double backward is refused with an
error."""

from __future__ import annotations

import pytest
import torch

from mona_peft import MonaAdapter
from mona_peft.fused import ScaledNormDown, scaled_norm_down


def _tiny_adapter(**kwargs: object) -> MonaAdapter:
    """A Mona adapter whose weights are all random (so no gradient is trivially zero)."""
    torch.manual_seed(0)
    adapter = MonaAdapter(32, bottleneck_dim=8, init_weights=False, **kwargs)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "scale" in name else 0.0))
    return adapter


def _delta_and_grads(adapter: MonaAdapter, fused: bool, x: torch.Tensor, grad: torch.Tensor, grid, num_prefix: int):
    adapter.fused = fused
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same dropout mask for both versions
    out = adapter(xi, grid, num_prefix)
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad(set_to_none=True)
    return out.detach(), xi.grad, grads


@pytest.mark.parametrize("merge_filters", [True, False])
@pytest.mark.parametrize("prefix_tokens", ["tokenwise", "unchanged"])
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_fused_delta_matches_the_plain_op_version(merge_filters: bool, prefix_tokens: str, num_prefix: int) -> None:
    adapter = _tiny_adapter(prefix_tokens=prefix_tokens).double().train()
    adapter.merge_filters = merge_filters
    x = torch.randn(3, num_prefix + 5 * 4, 32, dtype=torch.float64)
    grad = torch.randn_like(x)
    out_a, gx_a, gp_a = _delta_and_grads(adapter, False, x, grad, (5, 4), num_prefix)
    out_b, gx_b, gp_b = _delta_and_grads(adapter, True, x, grad, (5, 4), num_prefix)
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(gx_b, gx_a)
    assert gp_a.keys() == gp_b.keys() and len(gp_a) == 16  # norm 2, s1, s2, down 2, three convs 6, proj 2, up 2
    for name in gp_a:
        torch.testing.assert_close(gp_b[name], gp_a[name], msg=name)


def test_scaled_norm_down_gradcheck() -> None:
    torch.manual_seed(0)
    shapes = [(2, 5, 6), (6,), (6,), (6,), (6,), (3, 6), (3,)]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *a: ScaledNormDown.apply(*a, 1e-5), inputs)
    # with a frozen input (the first Mona after a frozen patch embedding): no input gradient is computed
    frozen_x = inputs[0].detach()
    assert torch.autograd.gradcheck(lambda *a: ScaledNormDown.apply(frozen_x, *a, 1e-5), inputs[1:])


def test_scaled_norm_down_is_the_plain_expression() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16) * 3 + 1
    gamma, beta, s1, s2 = torch.randn(16), torch.randn(16), torch.randn(16), torch.randn(16)
    weight, bias = torch.randn(4, 16), torch.randn(4)
    plain = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(x, (16,), gamma, beta, 1e-6) * s1 + x * s2, weight, bias
    )
    torch.testing.assert_close(scaled_norm_down(x, gamma, beta, s1, s2, weight, bias, 1e-6), plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_train_step_matches_plain_op_version(dtype: torch.dtype) -> None:
    """Under autocast the down projection runs in low precision while x and the weights stay float32: the backward
    must accept the low-precision gradient and agree with the plain-op version at that precision."""
    adapter = _tiny_adapter().train()
    x = torch.randn(2, 1 + 4 * 4, 32)
    grad = torch.randn_like(x)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=dtype):
            results.append(_delta_and_grads(adapter, fused, x, grad, (4, 4), 1))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert out_b.dtype == out_a.dtype and gx_b.dtype == torch.float32
    torch.testing.assert_close(out_b.float(), out_a.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(gx_b, gx_a, rtol=0.05, atol=0.05)
    for name in gp_a:
        assert gp_b[name].dtype == torch.float32, name
        scale = gp_a[name].abs().max().clamp_min(1e-3)
        assert ((gp_b[name] - gp_a[name]).abs().max() / scale).item() < 0.05, name


def test_double_backward_is_refused_with_an_error() -> None:
    adapter = _tiny_adapter().double().eval()
    x = torch.randn(1, 1 + 3 * 3, 32, dtype=torch.float64, requires_grad=True)
    out = adapter(x, (3, 3), 1)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()
