"""Export: ``torch.export`` and the dynamo ONNX exporter on models with Mona, checked against eager PyTorch.

What is exported is ``peft_model.get_base_model()``: the transformers model with Mona's layers inside (its forward
has named arguments, so ``dynamic_shapes`` can be keyed by ``pixel_values``). The recipe is in docs/deploy.md.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.export import Dim

import mona_peft
import tiny_models as tm

FAMILIES = ["vit", "swin"]
SIZE = (32, 32)  # the tiny models' native image size


def mona_model(family: str) -> torch.nn.Module:
    """A tiny wrapped model with random (clearly non-identity) Mona weights, in eval mode."""
    torch.manual_seed(0)
    config = mona_peft.MonaConfig(bottleneck_dim=8, init_weights=False, modules_to_save=["classifier"])
    model = get_peft_model(tm.FAMILIES[family].build(), config).eval()
    tm.randomize_adapter(model)
    return model


@torch.no_grad()
def eager_logits(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(pixel_values=x, **kwargs).logits


def assert_mona_matters(model, x: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    """The adapters change the output, so an export that dropped Mona could not match ``expected``."""
    with model.disable_adapter():
        plain = eager_logits(model, x, **kwargs)
    assert (plain - expected).abs().max() > 1e-2


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request) -> tuple[torch.nn.Module, torch.export.ExportedProgram]:
    """A Mona model and its ``torch.export`` program (dynamic batch, static image size)."""
    model = mona_model(request.param)
    batch = Dim("batch", min=1, max=64)
    program = torch.export.export(
        model.get_base_model(), (), {"pixel_values": tm.pixels(SIZE)}, dynamic_shapes={"pixel_values": {0: batch}}
    )
    return model, program


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not available on this platform (install the `test` extra)"
    )


def test_torch_export_matches_eager(exported) -> None:
    model, program = exported
    x = tm.pixels(SIZE, batch=2)
    expected = eager_logits(model, x)
    assert_mona_matters(model, x, expected)

    module = program.module()
    torch.testing.assert_close(module(pixel_values=x).logits, expected, atol=1e-5, rtol=1e-5)
    for batch in (1, 5):  # the batch dimension is dynamic
        other = tm.pixels(SIZE, batch=batch, seed=batch)
        torch.testing.assert_close(module(pixel_values=other).logits, eager_logits(model, other), atol=1e-5, rtol=1e-5)
    # exporting left the eager model as it was
    torch.testing.assert_close(eager_logits(model, x), expected, atol=0, rtol=0)

    # The image size is static: the program refuses another size instead of computing on a wrong token grid.
    with pytest.raises(Exception, match=r"(?i)guard|shape|size"):
        module(pixel_values=tm.pixels((40, 24), batch=2))


def test_onnx_matches_eager_and_refuses_other_sizes(exported, ort, tmp_path) -> None:
    model, program = exported
    path = tmp_path / "model.onnx"
    torch.onnx.export(program, (), str(path), input_names=["pixel_values"], output_names=["logits"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    for batch in (2, 5, 1):  # dynamic batch, static image size
        images = tm.pixels(SIZE, batch=batch, seed=batch)
        expected = eager_logits(model, images)
        if batch == 2:
            assert_mona_matters(model, images, expected)
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)

    # The graph was built for one image size (the patch grid Mona filters over, Swin's windows): onnxruntime refuses
    # another size rather than returning numbers for it.
    with pytest.raises(Exception, match=r"(?i)invalid dimensions"):
        session.run(["logits"], {"pixel_values": tm.pixels((40, 24), batch=2).numpy()})


@pytest.mark.filterwarnings("ignore:# ONNX model has different number of inputs:UserWarning")
def test_onnx_vit_dynamic_batch_and_image_size(ort, tmp_path) -> None:
    """ViT takes any image size with ``interpolate_pos_encoding=True``, and Mona's grid then follows the input.

    An ONNX graph has no guards: a grid baked in from the example input (a 5x3 patch grid here) would silently run
    Mona's filter over the wrong tokens at every other size, or fail there, so several sizes are checked.
    """
    model = mona_model("vit")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(
        model.get_base_model(),
        (),
        str(path),
        kwargs={"pixel_values": tm.pixels((40, 24)), "interpolate_pos_encoding": True},
        dynamic_shapes={
            "pixel_values": {0: Dim("batch", min=1, max=64), 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},
            "interpolate_pos_encoding": None,
        },
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    for size, batch in (((40, 24), 2), ((48, 48), 3), ((64, 40), 1), ((32, 32), 2), ((24, 24), 2)):
        images = tm.pixels(size, batch=batch, seed=batch)
        expected = eager_logits(model, images, interpolate_pos_encoding=True)
        if size == (48, 48):
            assert_mona_matters(model, images, expected, interpolate_pos_encoding=True)
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        torch.testing.assert_close(
            torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4, msg=lambda m, size=size: f"size {size}: {m}"
        )
