"""The wrapped model against a hand-written reference of Mona and of its placement in a block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import mona_peft
from mona_peft import MonaConfig, MonaLayer
from mona_peft.filters import depthwise_conv, merged_filter, reference_filter
from tiny_models import FAMILIES, pixels, randomize_adapter


class OfficialMona(nn.Module):
    """Mona written the way the official code structures it (conv1/2/3, projector, gamma/gammax, project1/2)."""

    def __init__(self, layer: MonaLayer, position: str, adapter: str = "default") -> None:
        super().__init__()
        mona = layer.adapters_of(adapter)[position]
        self.norm, self.gamma, self.gammax = mona.norm, mona.scale_norm, mona.scale_skip
        self.project1, self.project2 = mona.down, mona.up
        self.conv1, self.conv2, self.conv3 = mona.conv3, mona.conv5, mona.conv7
        self.projector = mona.proj

    def forward(self, x: torch.Tensor, hw: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        identity = x
        x = self.norm(x) * self.gamma + x * self.gammax
        p1 = self.project1(x)
        prefix, p1 = p1[:, :num_prefix], p1[:, num_prefix:]
        b, n, c = p1.shape
        h, w = hw
        p1 = p1.reshape(b, h, w, c).permute(0, 3, 1, 2)
        p1 = (self.conv1(p1) + self.conv2(p1) + self.conv3(p1)) / 3.0 + p1
        p1 = p1.permute(0, 2, 3, 1).reshape(b, n, c)
        p1 = torch.cat([prefix, p1], dim=1)
        # the projector is a 1x1 conv on the [B, m, H, W] map; token-wise it is the same for prefix tokens
        p1 = p1 + self.projector(p1.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return identity + self.project2(F.gelu(p1))


def _mlp_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP branch of a ViT / Swin block, whatever the transformers version names its modules."""
    h = block.layernorm_after(x)
    if hasattr(block, "mlp"):  # transformers >= 5.9
        return block.dropout(block.mlp(h))
    return (
        block.output(block.intermediate(h), torch.zeros_like(x))
        if block.output.forward.__code__.co_argcount > 2
        else block.output(block.intermediate(h))
    )


def _attention_residual(block: nn.Module, run_block) -> torch.Tensor:
    """x1 = x + attention branch, obtained by running the bare block with its MLP branch silenced."""
    join = block.output if hasattr(block, "output") else block.dropout
    calls = []

    def silence(module, args, output):
        calls.append(1)
        # ViT 4.x's output module adds the residual itself: keep that part, drop the MLP.
        if len(args) > 1:
            return args[1]
        return torch.zeros_like(output) if len(calls) == 2 or not hasattr(block, "mlp") else None

    handle = join.register_forward_hook(silence)
    try:
        out = run_block()
    finally:
        handle.remove()
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_block_matches_reference(family: str) -> None:
    spec = FAMILIES[family]
    base = spec.build()
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8, init_weights=False, dropout=0.0))
    randomize_adapter(model)
    layer = next(m for m in model.modules() if isinstance(m, MonaLayer))
    block = layer.base_layer
    captured = {}

    def capture(module, args, kwargs, output):
        captured["args"], captured["kwargs"], captured["out"] = args, kwargs, output

    handle = layer.register_forward_hook(capture, with_kwargs=True)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        model(pixel_values=x, **spec.forward_kwargs)
    handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    hidden = args[0]
    if family == "vit":
        grid = (spec.odd_size[0] // 8, spec.odd_size[1] // 8)
        num_prefix = 1
    else:
        grid = tuple(args[1]) if len(args) > 1 else tuple(kwargs["input_dimensions"])
        num_prefix = 0

    with torch.no_grad():
        x1 = _attention_residual(block, lambda: block(*args, **kwargs))
        if family == "vit":
            attention = block.attention(block.layernorm_before(hidden))
            attention = attention[0] if isinstance(attention, tuple) else attention  # tuple in 5.x, tensor in 4.57
            expected_x1 = hidden + attention
            torch.testing.assert_close(x1, expected_x1, atol=1e-6, rtol=1e-6)
        mona1, mona2 = OfficialMona(layer, "attention"), OfficialMona(layer, "mlp")
        x1 = mona1(x1, grid, num_prefix)  # the residual AND the input of the second norm
        x2 = x1 + _mlp_branch(block, x1)
        expected = mona2(x2, grid, num_prefix)
    out = captured["out"]
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the adapter really changed something (the test is not comparing two no-ops)
    assert (expected - _attention_residual(block, lambda: block(*args, **kwargs))).abs().max() > 1e-2


@pytest.mark.parametrize("kernels", [(3, 5, 7), (3,), (1, 5), (7, 3, 9)])
def test_merged_filter_equals_reference(kernels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = 6
    x = torch.randn(2, m, 5, 9, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(m, 1, k, k, dtype=torch.float64, requires_grad=True) for k in kernels]
    biases = [torch.randn(m, dtype=torch.float64, requires_grad=True) for _ in kernels]
    ref = reference_filter(x, weights, biases)
    fused = merged_filter(x, weights, biases)
    torch.testing.assert_close(fused, ref)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, *weights, *biases])
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, *weights, *biases])
    for a, b in zip(grads_ref, grads_fused, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("batch", "height", "width", "size", "layout", "bias", "needs"),
    [
        (2, 5, 7, 3, "dense", True, "all"),
        (1, 4, 4, 5, "channels-last view", True, "all"),  # as MonaAdapter.forward passes it
        (3, 6, 2, 7, "dense", False, "kernel"),  # kernel larger than the map; only the kernel's gradient
        (2, 3, 5, 1, "channels-last view", True, "input"),
    ],
)
def test_depthwise_conv_matches_conv2d_and_its_gradients(batch, height, width, size, layout, bias, needs) -> None:
    """The merged filter's conv: values and every gradient equal F.conv2d's, numerically checked as well."""
    torch.manual_seed(0)
    m = 3
    if layout == "dense":
        x = torch.randn(batch, m, height, width, dtype=torch.float64)
    else:  # [B, h*w, m] tokens seen as [B, m, h, w]
        x = torch.randn(batch, height * width, m, dtype=torch.float64).transpose(1, 2).reshape(batch, m, height, width)
    kernel = torch.randn(m, 1, size, size, dtype=torch.float64)
    b = torch.randn(m, dtype=torch.float64) if bias else None
    x.requires_grad_(needs in ("all", "input"))
    kernel.requires_grad_(needs in ("all", "kernel"))
    if b is not None:
        b.requires_grad_(needs == "all")
    inputs = [t for t in (x, kernel, b) if t is not None and t.requires_grad]

    out = depthwise_conv(x, kernel, b)
    expected = F.conv2d(x, kernel, b, padding=size // 2, groups=m)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *t: depthwise_conv(*_fill(t, x, kernel, b)), inputs)


def test_depthwise_conv_kernel_gradient_over_several_chunks() -> None:
    """Maps big enough that the kernel's gradient is summed over chunks of samples (1 MB per sample: chunks of 2, 2
    and 1 samples): still F.conv2d's gradients."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, 180, 180, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(4, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 4, 180, 180, dtype=torch.float64)
    got = torch.autograd.grad(depthwise_conv(x, kernel, bias), [x, kernel, bias], grad)
    want = torch.autograd.grad(F.conv2d(x, kernel, bias, padding=3, groups=4), [x, kernel, bias], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_depthwise_conv_higher_order_and_functional_autograd() -> None:
    """Double backward, forward-mode AD and torch.func transforms work as they do for F.conv2d."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(depthwise_conv, (x, kernel, bias))
    assert torch.autograd.gradcheck(depthwise_conv, (x, kernel, bias), check_forward_ad=True, check_backward_ad=False)

    def reference(x, kernel, bias):
        return F.conv2d(x, kernel, bias, padding=1, groups=3)

    def loss(fn):
        return lambda k, x: fn(x, k, bias).square().sum()

    torch.testing.assert_close(
        torch.func.grad(loss(depthwise_conv))(kernel, x), torch.func.grad(loss(reference))(kernel, x)
    )
    per_sample = torch.func.vmap(torch.func.grad(loss(depthwise_conv)), in_dims=(None, 0))(kernel, x[:, None])
    expected = torch.func.vmap(torch.func.grad(loss(reference)), in_dims=(None, 0))(kernel, x[:, None])
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize(
    "case", ["bfloat16", "float16", "empty batch", "autocast", "no grad", "even kernel", "non-square kernel"]
)
def test_depthwise_conv_elsewhere_equals_conv2d_exactly(case: str) -> None:
    """Where the custom backward is not used (low precision, autocast, no gradient, an empty batch, kernels the
    function does not take): values and gradients are F.conv2d's, bit for bit."""
    torch.manual_seed(0)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(case, torch.float32)
    batch = 0 if case == "empty batch" else 2
    shape = {"even kernel": (4, 4), "non-square kernel": (3, 5)}.get(case, (5, 5))
    x = torch.randn(batch, 3, 6, 6, dtype=dtype, requires_grad=case != "no grad")
    kernel = torch.randn(3, 1, *shape, dtype=dtype, requires_grad=case != "no grad")

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            out = fn()
        grads = torch.autograd.grad(out.sum(), [x, kernel]) if out.requires_grad else ()
        return out, *grads

    got = run(lambda: depthwise_conv(x, kernel, None))
    want = run(lambda: F.conv2d(x, kernel, None, padding=shape[-1] // 2, groups=3))
    assert len(got) == len(want) == (1 if case == "no grad" else 3)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _fill(given, x, kernel, bias):
    """(x, kernel, bias) with the tensors that require grad replaced by ``given``, in order."""
    given = iter(given)
    return [next(given) if t is not None and t.requires_grad else t for t in (x, kernel, bias)]


def test_merged_and_reference_models_agree() -> None:
    spec = FAMILIES["dinov2_registers"]
    outputs = []
    for merge in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False))
        assert mona_peft.set_compute(model, merge_filters=merge) == 2 * 2  # two blocks, two positions
        randomize_adapter(model)
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels(spec.odd_size)).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
