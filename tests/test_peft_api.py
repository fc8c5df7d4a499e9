"""What PEFT users rely on: saving/loading, several adapters, disable/unload, dtypes, freezing, checkpointing."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from mona_peft import MonaConfig, MonaLayer
from tiny_models import FAMILIES, logits, pixels, randomize_adapter


def _wrapped(family: str = "vit", seed: int = 0, modules_to_save=("classifier",), **config_kwargs):
    spec = FAMILIES[family]
    torch.manual_seed(0)
    base = spec.build()
    heads = list(modules_to_save) if modules_to_save else None
    config = MonaConfig(bottleneck_dim=8, init_weights=False, modules_to_save=heads, **config_kwargs)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapter(model, seed=seed)
    return spec, base, model.eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_load_round_trip(tmp_path, family: str, safe_serialization: bool) -> None:
    spec, base, model = _wrapped(family)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = logits(model, x, **spec.forward_kwargs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights_file = tmp_path / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin")
    assert weights_file.exists()
    saved = load_file(weights_file) if safe_serialization else torch.load(weights_file, weights_only=True)
    # adapter-only: Mona weights and the head, nothing of the frozen backbone
    assert saved and all(".mona_" in k or "classifier" in k for k in saved)
    assert not any(".default." in k for k in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MONA" and config["bottleneck_dim"] == 8

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(logits(loaded, x, **spec.forward_kwargs), expected)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), MonaConfig)


def test_low_cpu_mem_usage_loading(tmp_path) -> None:
    spec, base, model = _wrapped("dinov2_registers")
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(logits(loaded, x), expected)


def test_several_adapters_set_delete_and_load_under_new_name(tmp_path) -> None:
    spec, base, model = _wrapped("swin", seed=1)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        out_default = logits(model, x)
    model.save_pretrained(tmp_path / "a")

    model.add_adapter("other", MonaConfig(bottleneck_dim=4, kernel_sizes=(3,), init_weights=False))
    randomize_adapter(model, seed=2)  # touches both adapters; re-save default's reference output
    with torch.no_grad():
        out_default = logits(model, x)
        model.set_adapter("other")
        out_other = logits(model, x)
    assert not torch.allclose(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".mona_" in n}
    assert trainable and all(".other" in n for n in trainable)

    model.set_adapter("default")
    model.save_pretrained(tmp_path / "b")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(logits(model, x), out_default)

    # load the same weights under another name and a name that is a substring of the first
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b", adapter_name="def")
    loaded.load_adapter(tmp_path / "b", adapter_name="default")
    loaded.eval()
    with torch.no_grad():
        for name in ("def", "default"):
            loaded.set_adapter(name)
            assert torch.equal(logits(loaded, x), out_default)


def test_disable_adapter_and_unload_are_bit_identical() -> None:
    spec, base, model = _wrapped("deit", modules_to_save=None)
    x = pixels(spec.odd_size)
    with torch.no_grad():
        expected = base(pixel_values=x, interpolate_pos_encoding=True).logits
        with model.disable_adapter():
            assert torch.equal(model(pixel_values=x, interpolate_pos_encoding=True).logits, expected)
        assert not torch.equal(model(pixel_values=x, interpolate_pos_encoding=True).logits, expected)
    unloaded = model.unload()
    assert not any(isinstance(m, MonaLayer) for m in unloaded.modules())
    assert not any(".mona_" in n for n, _ in unloaded.named_parameters())
    hooks = [h for m in unloaded.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert not any(isinstance(getattr(h, "__self__", None), MonaLayer) for h in hooks)
    with torch.no_grad():
        assert torch.equal(unloaded(pixel_values=x, interpolate_pos_encoding=True).logits, expected)


def test_merging_is_refused_with_an_explanation() -> None:
    _, _, model = _wrapped("vit")
    for call in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    spec = FAMILIES["swin"]
    base = spec.build().to(dtype)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8, init_weights=False))
    # PEFT keeps trainable adapter weights in float32 by default; Mona computes in the activations' dtype
    assert {p.dtype for n, p in model.named_parameters() if ".mona_" in n} == {torch.float32}
    x = pixels(spec.image_size).to(dtype)
    out = logits(model, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    cast = get_peft_model(spec.build().to(dtype), MonaConfig(bottleneck_dim=8), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in cast.named_parameters() if ".mona_" in n} == {dtype}
    model.to(torch.float32)
    assert logits(model, x.float()).dtype == torch.float32


@pytest.mark.parametrize("family", ["vit", "swin", "dinov2"])
def test_training_changes_only_adapter_and_head(family: str) -> None:
    spec, _, model = _wrapped(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(2):
        loss = model(pixel_values=pixels(spec.image_size), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".mona_" in n for n in changed) and any("modules_to_save" in n for n in changed)
    assert all(".mona_" in n or ".modules_to_save." in n for n in changed), changed


@pytest.mark.parametrize(
    ("family", "reentrant"),
    [("vit", False), ("vit", True), ("deit", False), ("dinov2_registers", False), ("swin", False), ("swinv2", False)],
)
def test_gradient_checkpointing_gives_the_same_gradients(family: str, reentrant: bool) -> None:
    spec = FAMILIES[family]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False, dropout=0.0))
        randomize_adapter(model)
        if checkpointing:  # the order Trainer uses: wrap first, then enable checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.base_model.model.is_gradient_checkpointing
        model.train()
        out = logits(model, pixels(spec.odd_size), **spec.forward_kwargs)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_threads_do_not_mix_up_grids() -> None:
    spec, _, model = _wrapped("vit")
    sizes = [(40, 24), (24, 40), (32, 32), (16, 48)]
    with torch.no_grad():
        expected = {s: logits(model, pixels(s, seed=sum(s)), interpolate_pos_encoding=True) for s in sizes}
    results, errors = {}, []

    def work(size):
        try:
            with torch.no_grad():
                for _ in range(5):
                    out = logits(model, pixels(size, seed=sum(size)), interpolate_pos_encoding=True)
                    results.setdefault(size, []).append(out)
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for size, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[size], atol=1e-6, rtol=1e-6)
