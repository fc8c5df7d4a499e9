"""Bad input gets a clear error that says what to do, and the user's model is left as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

from mona_peft import MonaConfig, MonaLayer
from mona_peft.checkpoint import MonaCheckpointError
from tiny_models import FAMILIES, pixels, randomize_adapter


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"bottleneck_dim": -3}, "bottleneck_dim"),
        ({"bottleneck_dim": 2.5}, "bottleneck_dim"),
        ({"kernel_sizes": (3, 4)}, "kernel_sizes"),
        ({"kernel_sizes": (0,)}, "kernel_sizes"),
        ({"kernel_sizes": (-3,)}, "kernel_sizes"),
        ({"kernel_sizes": ()}, "kernel_sizes"),
        ({"kernel_sizes": (3, 3)}, "kernel_sizes"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"positions": ("attention", "ffn")}, "positions"),
        ({"positions": ()}, "positions"),
        ({"prefix_tokens": "drop"}, "prefix_tokens"),
    ],
)
def test_invalid_config_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"MonaConfig.{field}"):
        MonaConfig(**kwargs)


def _assert_untouched(model: nn.Module, expected: torch.Tensor, x: torch.Tensor) -> None:
    assert not any(isinstance(m, MonaLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    hooks = [
        hook
        for m in model.modules()
        for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
        if isinstance(getattr(hook, "__self__", None), MonaLayer)
    ]
    assert not hooks and not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, expected)


def test_targets_matching_nothing_are_named() -> None:
    base = FAMILIES["vit"].build()
    with pytest.raises(ValueError, match="no_such_block.*match no module"):
        get_peft_model(base, MonaConfig(target_modules=["no_such_block"]))
    assert not any(isinstance(m, MonaLayer) for m in base.modules())


def test_targets_that_are_not_blocks_are_refused() -> None:
    spec = FAMILIES["vit"]
    base = spec.build()
    x = pixels(spec.image_size)
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    with pytest.raises(ValueError, match="wraps whole transformer blocks.*ViTLayer"):
        get_peft_model(base, MonaConfig(target_modules=r".*(layers|layer)\.\d+(\.layernorm_after)?"))
    _assert_untouched(base, expected, x)


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    bert = transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="no supported transformer block.*ViTLayer.*SwinLayer.*Swinv2Layer"):
        get_peft_model(bert, MonaConfig())
    with pytest.raises(ValueError, match="no supported transformer block"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), MonaConfig())


def _saved_adapter(tmp_path, family="vit", **config_kwargs):
    spec = FAMILIES[family]
    model = get_peft_model(spec.build(), MonaConfig(bottleneck_dim=8, init_weights=False, **config_kwargs))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def _fresh_vit(hidden_size: int = 32):
    spec = FAMILIES["vit"]
    base = (
        spec.build()
        if hidden_size == 32
        else transformers.ViTForImageClassification(
            transformers.ViTConfig(
                hidden_size=hidden_size,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                image_size=32,
                patch_size=8,
                num_labels=3,
            )
        ).eval()
    )
    x = pixels(spec.image_size)
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    return base, expected, x


def test_truncated_safetensors(tmp_path) -> None:
    path = _saved_adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    base, expected, x = _fresh_vit()
    with pytest.raises(MonaCheckpointError, match="corrupted or truncated"):
        PeftModel.from_pretrained(base, path)
    _assert_untouched(base, expected, x)


def test_garbage_safetensors(tmp_path) -> None:
    path = _saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    base, expected, x = _fresh_vit()
    with pytest.raises(MonaCheckpointError, match="corrupted or truncated"):
        PeftModel.from_pretrained(base, path)
    _assert_untouched(base, expected, x)


def test_adapter_for_another_width(tmp_path) -> None:
    path = _saved_adapter(tmp_path)
    base, expected, x = _fresh_vit(hidden_size=48)
    with pytest.raises(MonaCheckpointError, match=r"wrong shape.*hidden size 48"):
        PeftModel.from_pretrained(base, path)
    _assert_untouched(base, expected, x)


def test_adapter_for_another_family(tmp_path) -> None:
    path = _saved_adapter(tmp_path, family="swin")
    base, expected, x = _fresh_vit()
    with pytest.raises(ValueError, match="match no module"):
        PeftModel.from_pretrained(base, path)
    _assert_untouched(base, expected, x)


def test_config_disagreeing_with_weights(tmp_path) -> None:
    path = _saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["bottleneck_dim"] = 16
    (path / "adapter_config.json").write_text(json.dumps(config))
    base, expected, x = _fresh_vit()
    with pytest.raises(MonaCheckpointError, match="bottleneck_dim=16"):
        PeftModel.from_pretrained(base, path)
    _assert_untouched(base, expected, x)


def test_load_adapter_failure_keeps_existing_adapter(tmp_path) -> None:
    good = _saved_adapter(tmp_path / "good")
    bad = _saved_adapter(tmp_path / "bad", kernel_sizes=(3,))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["kernel_sizes"] = [3, 5]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    base, _, x = _fresh_vit()
    model = PeftModel.from_pretrained(base, good)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(MonaCheckpointError, match="missing"):
        model.load_adapter(bad, adapter_name="other")
    assert "other" not in model.peft_config
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, before)


def test_mona_config_refuses_another_methods_adapter(tmp_path) -> None:
    from peft import LoraConfig

    LoraConfig(target_modules=["dense"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a LORA adapter, not a Mona adapter"):
        MonaConfig.from_pretrained(tmp_path)
