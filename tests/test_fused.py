"""The fused scaled norm + down projection (``mona_peft.fused``) and the ``MonaLayer.mona_delta`` built on it compute
what the plain-op version computes (``benchmarks/unfused.py``, the code before the fusion): outputs, the input
gradient and all 16 parameter gradients in float64; gradcheck of the autograd function; autocast; double backward is
refused with an error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

import mona_peft
from mona_peft.families import layout_for
from mona_peft.fused import ScaledNormDown, scaled_norm_down
from mona_peft.layer import MonaLayer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.unfused import unfused_mona_delta  # noqa: E402


def _tiny_mona_layer(**config: object) -> MonaLayer:
    """A ViT block with Mona whose adapter weights are all random (so no gradient is trivially zero)."""
    torch.manual_seed(0)
    block = ViTLayer(ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64))
    layer = MonaLayer(
        block, "default", mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False, **config), layout_for(block)
    )
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "mona_" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "scale" in name else 0.0))
    return layer


def _delta_and_grads(layer: MonaLayer, delta_fn, x: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]):
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same dropout mask for both versions
    out = delta_fn(layer, "default", "attention", xi, grid)
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach(), xi.grad, grads


@pytest.mark.parametrize("merge_filters", [True, False])
@pytest.mark.parametrize("prefix_tokens", ["tokenwise", "unchanged"])
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_fused_delta_matches_the_plain_op_version(merge_filters: bool, prefix_tokens: str, num_prefix: int) -> None:
    layer = _tiny_mona_layer(merge_filters=merge_filters, prefix_tokens=prefix_tokens).double().train()
    x = torch.randn(3, num_prefix + 5 * 4, 32, dtype=torch.float64)
    grad = torch.randn_like(x)
    out_a, gx_a, gp_a = _delta_and_grads(layer, unfused_mona_delta, x, grad, (5, 4))
    out_b, gx_b, gp_b = _delta_and_grads(layer, MonaLayer.mona_delta, x, grad, (5, 4))
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
    layer = _tiny_mona_layer().train()
    x = torch.randn(2, 1 + 4 * 4, 32)
    grad = torch.randn_like(x)
    results = []
    for fn in (unfused_mona_delta, MonaLayer.mona_delta):
        with torch.autocast("cpu", dtype=dtype):
            results.append(_delta_and_grads(layer, fn, x, grad, (4, 4)))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert out_b.dtype == out_a.dtype and gx_b.dtype == torch.float32
    torch.testing.assert_close(out_b.float(), out_a.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(gx_b, gx_a, rtol=0.05, atol=0.05)
    for name in gp_a:
        assert gp_b[name].dtype == torch.float32, name
        scale = gp_a[name].abs().max().clamp_min(1e-3)
        assert ((gp_b[name] - gp_a[name]).abs().max() / scale).item() < 0.05, name


def test_double_backward_is_refused_with_an_error() -> None:
    layer = _tiny_mona_layer().double().eval()
    x = torch.randn(1, 1 + 3 * 3, 32, dtype=torch.float64, requires_grad=True)
    out = layer.mona_delta("default", "attention", x, (3, 3))
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()
