"""torch.compile and gradient checkpointing on the families added after ViT/DINOv2/Swin (docs/limits.md)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from mona_peft import MonaConfig
from test_families_packed import CASES as PACKED
from tiny_vision_towers import TOWERS, perturb_trainable, tensors

# Towers fed [B, C, H, W] images whose grid is read from the patch conv or the block input (SAM): no host reads.
COMPILED = ["dinov3", "clip_vision", "siglip_vision", "beit", "data2vec_vision", "sam_vision"]


def _case(name: str):
    if name in TOWERS:
        tower = TOWERS[name]
        return tower.build, tower.inputs
    case = PACKED[name]
    return case.build, case.inputs


def _mona(name: str) -> tuple[torch.nn.Module, dict]:
    build, inputs = _case(name)
    torch.manual_seed(0)
    model = get_peft_model(build(), MonaConfig(bottleneck_dim=8, init_weights=False, dropout=0.0))
    perturb_trainable(model)
    return model, inputs()


@pytest.mark.parametrize("name", COMPILED)
def test_compiles_without_graph_breaks_and_matches_eager(name: str) -> None:
    model, inputs = _mona(name)
    base = model.get_base_model().eval()
    with torch.no_grad():
        expected = tensors(base(**inputs))
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(base)(**inputs)
        assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
        torch._dynamo.reset()
        compiled = tensors(torch.compile(base, backend="aot_eager")(**inputs))
    torch._dynamo.reset()
    assert len(compiled) == len(expected)
    for got, want in zip(compiled, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dinov3", "clip_vision", "beit", "sam_vision", "siglip2_vision", "qwen2_5_tower"])
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model, inputs = _mona(name)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        model.train()
        loss = sum(t.float().square().mean() for t in tensors(model(**inputs)) if t.is_floating_point())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".mona_" in n for n in grads[0])
    for name_, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name_], grad, atol=1e-5, rtol=1e-4, msg=name_)
