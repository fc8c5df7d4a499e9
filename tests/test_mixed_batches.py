"""Mixed-adapter batches: ``model(pixel_values, adapter_names=[...])`` routes each sample to its own adapter (and its
own ``modules_to_save`` head), ``"__base__"`` to none; each sample equals a separate run with its adapter."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from mona_peft import MonaConfig
from tiny_models import FAMILIES, pixels, randomize_adapter

ALL = sorted(FAMILIES)


def _two_adapter_model(family: str):
    torch.manual_seed(0)
    model = get_peft_model(FAMILIES[family].build(), MonaConfig(bottleneck_dim=8, init_weights=False))
    model.add_adapter("small", MonaConfig(bottleneck_dim=4, positions=("mlp",), kernel_sizes=(3,), init_weights=False))
    randomize_adapter(model)  # every adapter weight and both heads random
    return model.eval()


def _alone(model, x: torch.Tensor, name: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(pixel_values=x, **kwargs).logits
        model.set_adapter(name)
        return model(pixel_values=x, **kwargs).logits


@pytest.mark.parametrize("family", ALL)
def test_each_sample_equals_a_run_with_its_own_adapter(family: str) -> None:
    spec = FAMILIES[family]
    model = _two_adapter_model(family)
    x = pixels(spec.odd_size, batch=5)
    names = ["default", "small", "__base__", "small", "default"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names, **spec.forward_kwargs).logits
    separate = torch.cat([_alone(model, x[i : i + 1], n, **spec.forward_kwargs) for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, separate, atol=1e-5, rtol=1e-5)
    # the three routes really differ (adapters and heads are not the same function)
    assert not torch.allclose(separate[0], separate[1]) and not torch.allclose(separate[1], separate[2])


def test_a_batch_of_one_adapter_equals_the_plain_forward() -> None:
    model = _two_adapter_model("swin")
    x = pixels((32, 32), batch=3)
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=["small"] * 3).logits
    torch.testing.assert_close(mixed, _alone(model, x, "small"), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["default", "typo", "__base__"], "does not have: typo"),
        (["default", "small"], "2 name.*3 sample"),
        ("default", "one adapter name"),
    ],
)
def test_bad_adapter_names_are_refused_and_nothing_changes(names, message: str) -> None:
    model = _two_adapter_model("vit")
    x = pixels((32, 32), batch=3)
    before = _alone(model, x, "default")
    with pytest.raises((ValueError, TypeError), match=message), torch.no_grad():
        model(pixel_values=x, adapter_names=names)
    assert model.active_adapter == "default"
    torch.testing.assert_close(_alone(model, x, "default"), before, atol=0, rtol=0)
    # no per-call hook is left behind
    assert all(not h for m in model.modules() for h in (m._forward_pre_hooks,) if "adapter_names" in str(h))


def test_mixed_batches_are_for_inference() -> None:
    model = _two_adapter_model("vit").train()
    with pytest.raises(ValueError, match="model.eval"):
        model(pixel_values=pixels((32, 32), batch=2), adapter_names=["default", "small"])
