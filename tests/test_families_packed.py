"""Families whose tokens are not a plain [B, prefix + h*w, C] grid: SigLIP2 NaFlex (each image its own grid, then
padding), SAM's image encoder ([B, H, W, C]), Qwen2-VL's packed vision tower (images and video frames packed into
[N, C] in spatial-merge order) and Qwen2.5-VL (the merge groups further permuted into attention windows).

The reference below is written with plain torch ops and rebuilds each image's 2-D grid from the order documented by
transformers (not from mona_peft's token layouts), so a filter run over a wrong neighbourhood would not match.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

from mona_peft import MonaAdapter, MonaConfig, MonaLayer
from tiny_models import randomize_adapter

V5 = int(transformers.__version__.split(".")[0]) >= 5
PATCH, MERGE = 4, 2  # SigLIP2 and Qwen patch size, Qwen spatial merge size
QWEN_WINDOW = 16  # Qwen2.5-VL window in pixels: 16 / MERGE / PATCH = 2 merge groups per side


# --------------------------------------------------------------------------------------------- tiny models, inputs
def _siglip2_vision_config() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH)


def siglip2_vision() -> nn.Module:
    config = transformers.Siglip2VisionConfig(**_siglip2_vision_config(), num_patches=16)
    return transformers.Siglip2VisionModel(config).eval()


def siglip2_dual() -> nn.Module:
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=99,
        max_position_embeddings=16,
    )
    vision = dict(**_siglip2_vision_config(), num_patches=16)
    return transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision)).eval()


def naflex(shapes: list[tuple[int, int]], length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """SigLIP2 inputs: each image's patches row-major, then padding up to ``length`` (random padding values)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(shapes), length, 3 * PATCH * PATCH, generator=generator)
    mask = torch.zeros(len(shapes), length, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(shapes))


_SAM_VISION = dict(
    hidden_size=32,
    output_channels=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=8,
    window_size=4,
    global_attn_indexes=[1],  # block 0 windowed, block 1 global
    mlp_dim=64,
    num_pos_feats=8,
    initializer_range=0.02,  # SamVisionConfig's default (1e-10) leaves every activation near zero
)


def sam_vision() -> nn.Module:
    return transformers.SamVisionModel(transformers.SamVisionConfig(**_SAM_VISION)).eval()


def sam_model() -> nn.Module:
    config = transformers.SamConfig(
        vision_config=_SAM_VISION,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    return transformers.SamModel(config).eval()


def sam_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(batch, 3, 64, 64, generator=generator))


def sam_prompts(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, 1, 2, generator=generator) * 32
    return dict(
        input_points=torch.rand(batch, 1, 2, 2, generator=generator) * 64,  # (batch, point batch, points, xy)
        input_labels=torch.ones(batch, 1, 2, dtype=torch.long),
        input_boxes=torch.cat([corner, corner + 24], dim=-1),  # (batch, boxes, x0 y0 x1 y1)
    )


def _qwen_vision(version: str) -> dict:
    common = dict(
        depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3
    )
    if version == "2":
        return dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
    # block 0 attends within windows, block 1 over whole frames
    return dict(
        common,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=64,
        window_size=QWEN_WINDOW,
        fullatt_block_indexes=[1],
    )


def qwen_tower(version: str) -> nn.Module:
    if version == "2":
        from transformers.models.qwen2_vl import configuration_qwen2_vl as config_module
        from transformers.models.qwen2_vl import modeling_qwen2_vl as model_module

        config = config_module.Qwen2VLVisionConfig(**_qwen_vision(version))
        return model_module.Qwen2VisionTransformerPretrainedModel(config).eval()
    from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as config_module
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as model_module

    config = config_module.Qwen2_5_VLVisionConfig(**_qwen_vision(version))
    return model_module.Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def qwen_vl(version: str) -> nn.Module:
    text = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if V5:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    else:
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    if version == "2":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=_qwen_vision(version), image_token_id=100)
        return transformers.Qwen2VLForConditionalGeneration(config).eval()
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=_qwen_vision(version), image_token_id=100)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


# An image of 4x6 patches, a video of two 4x4 frames, an image of 6x4 patches.
QWEN_GRID = [(1, 4, 6), (2, 4, 4), (1, 6, 4)]


def qwen_pixels(grid: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grid), 3 * 2 * PATCH * PATCH, generator=generator)


def qwen_tower_inputs(grid=QWEN_GRID, seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(hidden_states=qwen_pixels(grid, seed), grid_thw=torch.tensor(grid))


def qwen_vl_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    grid = [(1, 4, 6), (1, 4, 4)]  # 6 and 4 image tokens after the 2x2 merge
    ids = torch.randint(0, 90, (1, 20), generator=torch.Generator().manual_seed(seed))
    ids[0, 2:8] = 100
    ids[0, 10:14] = 100
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=qwen_pixels(grid, seed),
        image_grid_thw=torch.tensor(grid),
    )
    if V5:
        inputs["mm_token_type_ids"] = (ids == 100).int()  # transformers 5.x requires it for Qwen2-VL
    return inputs


def _tensors(out: Any) -> dict[str, torch.Tensor]:
    """The float tensors of a model output (4.57's Qwen towers return the merged tokens as a plain tensor)."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    blocks: tuple[str, ...]  # the blocks Mona must adapt by default
    heads: tuple[str, ...] = ()  # the default modules_to_save


_SIGLIP2_BLOCKS = tuple(f"{'' if V5 else 'vision_model.'}encoder.layers.{i}" for i in range(2))
_SAM_HEADS = ("prompt_encoder", "mask_decoder")

CASES = {
    "siglip2_vision": Case(siglip2_vision, lambda: naflex([(3, 5), (4, 4)], 20), _SIGLIP2_BLOCKS),
    "siglip2_dual": Case(
        siglip2_dual,
        lambda: dict(naflex([(3, 5), (4, 4)], 20), input_ids=torch.randint(0, 99, (2, 7))),
        ("vision_model.encoder.layers.0", "vision_model.encoder.layers.1"),
    ),
    "sam_vision": Case(sam_vision, sam_inputs, ("vision_encoder.layers.0", "vision_encoder.layers.1")),
    # transformers 5.x made SAM's shared positional embedding a parameter tied to the prompt encoder's (4.57: a
    # buffer); a module whose parameters are all tied elsewhere is not a head, so both lines pick the same two.
    "sam_model": Case(
        sam_model,
        lambda: dict(sam_inputs(), **sam_prompts()),
        ("vision_encoder.layers.0", "vision_encoder.layers.1"),
        _SAM_HEADS,
    ),
    "qwen2_tower": Case(lambda: qwen_tower("2"), qwen_tower_inputs, ("blocks.0", "blocks.1")),
    "qwen2_5_tower": Case(lambda: qwen_tower("2.5"), qwen_tower_inputs, ("blocks.0", "blocks.1")),
    "qwen2_vl": Case(lambda: qwen_vl("2"), qwen_vl_inputs, ("model.visual.blocks.0", "model.visual.blocks.1")),
    "qwen2_5_vl": Case(lambda: qwen_vl("2.5"), qwen_vl_inputs, ("model.visual.blocks.0", "model.visual.blocks.1")),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build()


def adapted(model: nn.Module) -> list[str]:
    prefix = "base_model.model."
    return [n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, MonaLayer)]


def wrap(model: nn.Module, **config: Any) -> PeftModel:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mona adapts image tokens only")  # Siglip2Model's text tower
        return get_peft_model(model, MonaConfig(bottleneck_dim=8, **config))


def random_mona(name: str, seed: int = 0, **config: Any) -> PeftModel:
    model = wrap(build(name), init_weights=False, dropout=0.0, **config)
    randomize_adapter(model, seed=seed)
    return model.eval()


# ------------------------------------------------------------------------------------------- hand-written reference
def reference_mona(adapter: MonaAdapter, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
    """Mona on tokens ``x`` [T, C]; ``grids`` holds one [H, W] map of token indices per image (or video frame): the
    depthwise filters run over each map; tokens on no map (padding) only skip the filter."""
    channels = x.shape[-1]
    scaled = F.layer_norm(x, (channels,), adapter.norm.weight, adapter.norm.bias, adapter.norm.eps)
    h = F.linear(scaled * adapter.scale_norm + x * adapter.scale_skip, adapter.down.weight, adapter.down.bias)
    m = h.shape[-1]
    z = h.clone()
    for grid in grids:
        image = h[grid].permute(2, 0, 1).unsqueeze(0)  # [1, m, H, W]
        convs = [F.conv2d(image, c.weight, c.bias, padding=c.kernel_size[0] // 2, groups=m) for c in adapter.convs]
        filtered = image + sum(convs) / len(convs)
        z[grid.flatten()] = filtered[0].permute(1, 2, 0).reshape(-1, m)
    z = z + F.conv2d(z.t()[None, :, :, None], adapter.proj.weight, adapter.proj.bias)[0, :, :, 0].t()
    return x + F.linear(F.gelu(z), adapter.up.weight, adapter.up.bias)


def siglip2_grids(shapes: list[tuple[int, int]], length: int) -> list[torch.Tensor]:
    """Sample b's image is its first h*w tokens, row-major: token (r, c) at b * length + r * w + c."""
    return [b * length + torch.arange(h * w).reshape(h, w) for b, (h, w) in enumerate(shapes)]


def sam_grids(batch: int, height: int, width: int) -> list[torch.Tensor]:
    return list(torch.arange(batch * height * width).reshape(batch, height, width))


def qwen_merge_index(grid: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per frame, the packed index of patch (r, c) in spatial-merge order (t, h/m, w/m, m, m)."""
    grids, offset = [], 0
    for t, h, w in grid:
        for f in range(t):
            index = torch.empty(h, w, dtype=torch.long)
            for r in range(h):
                for c in range(w):
                    group = (r // MERGE) * (w // MERGE) + c // MERGE
                    index[r, c] = offset + f * h * w + group * MERGE * MERGE + (r % MERGE) * MERGE + c % MERGE
            grids.append(index)
        offset += t * h * w
    return grids


def qwen_window_order(grid: list[tuple[int, int, int]], groups_per_window: int) -> list[int]:
    """Qwen2.5-VL's window index: merge groups frame by frame, windows row-major, groups row-major in a window; entry
    k is the merge-order group placed at position k."""
    order, offset = [], 0
    for t, h, w in grid:
        gh, gw = h // MERGE, w // MERGE
        for f in range(t):
            for wr in range(0, gh, groups_per_window):
                for wc in range(0, gw, groups_per_window):
                    for r in range(wr, min(wr + groups_per_window, gh)):
                        for c in range(wc, min(wc + groups_per_window, gw)):
                            order.append(offset + f * gh * gw + r * gw + c)
        offset += t * gh * gw
    return order


def qwen_window_index(grid: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per frame, the index of patch (r, c) in Qwen2.5-VL's stream: its merge group moved to its window position."""
    order = qwen_window_order(grid, QWEN_WINDOW // MERGE // PATCH)
    position = {group: k for k, group in enumerate(order)}
    unit = MERGE * MERGE
    return [
        torch.tensor([[position[int(j) // unit] * unit + int(j) % unit for j in row] for row in frame])
        for frame in qwen_merge_index(grid)
    ]


def capture_blocks(model: nn.Module, inputs: dict) -> list[dict]:
    """Run ``model`` and record, for every Mona layer, its call's arguments and output."""
    records, handles = [], []
    for layer in (m for m in model.modules() if isinstance(m, MonaLayer)):
        record = {"layer": layer}
        records.append(record)

        def hook(module, args, kwargs, output, record=record):
            record.update(args=args, kwargs=kwargs, out=output[0] if isinstance(output, tuple) else output)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def check_block_against_reference(record: dict, norm2: str, grids: list[torch.Tensor]) -> None:
    """The wrapped block's output equals x1 -> mona_1 -> + mlp(norm2(.)) -> mona_2, where x1 (the post-attention
    stream) is the input of the bare block's second norm on the same call."""
    layer = record["layer"]
    block = layer.base_layer
    seen = {}
    handle = getattr(block, norm2).register_forward_pre_hook(lambda m, args: seen.setdefault("x1", args[0]))
    with torch.no_grad():
        bare = block(*record["args"], **record["kwargs"])
    handle.remove()
    bare = bare[0] if isinstance(bare, tuple) else bare
    x1 = seen["x1"]
    channels = x1.shape[-1]
    adapters = layer.adapters_of("default")
    with torch.no_grad():
        y1 = reference_mona(adapters["attention"], x1.reshape(-1, channels), grids).reshape(x1.shape)
        y2 = y1 + block.mlp(getattr(block, norm2)(y1))
        expected = reference_mona(adapters["mlp"], y2.reshape(-1, channels), grids).reshape(x1.shape)
    torch.testing.assert_close(record["out"], expected, atol=1e-5, rtol=1e-5)
    assert (expected - bare).abs().max() > 1e-2  # the adapters really act: not two no-ops compared


# ------------------------------------------------------------------------------------------------ generic properties
@pytest.mark.parametrize("name", sorted(CASES))
def test_default_targets_heads_and_identity_at_init(name: str) -> None:
    case = CASES[name]
    base = build(name)
    inputs = case.inputs()
    # Gradient flags as PEFT leaves them (base frozen, heads trainable): some CPU kernels round differently when
    # weights require grad, even under no_grad, whatever the adapter does (SigLIP2's nn.MultiheadAttention pooling
    # head 7e-8 and SAM's mask decoder 7e-13 apart from their unfrozen selves).
    base.requires_grad_(False)
    for head in case.heads:
        base.get_submodule(head).requires_grad_(True)
    with torch.no_grad():
        expected = _tensors(base(**inputs))
    model = wrap(base)
    assert adapted(model) == list(case.blocks)
    assert tuple(model.peft_config["default"].modules_to_save or ()) == case.heads
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mona_" in n or ".modules_to_save." in n for n in trainable)
    with torch.no_grad():
        got = _tensors(model(**inputs))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_reload_give_identical_outputs(name: str, tmp_path) -> None:
    model = random_mona(name, seed=3)
    model.requires_grad_(False)  # as the reloaded model is (see the gradient flags note above)
    inputs = CASES[name].inputs()
    with torch.no_grad():
        expected = _tensors(model(**inputs))
        with model.disable_adapter():
            base = _tensors(model(**inputs))
    assert any(not torch.allclose(expected[k], base[k]) for k in expected)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(name), tmp_path).eval()
    assert adapted(reloaded) == list(CASES[name].blocks)
    with torch.no_grad():
        got = _tensors(reloaded(**inputs))
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# --------------------------------------------------------------------------------------------------------- SigLIP2
def test_siglip2_blocks_match_reference_on_each_images_grid() -> None:
    model = random_mona("siglip2_vision")
    shapes, length = [(3, 5), (4, 4), (2, 3)], 20
    records = capture_blocks(model, naflex(shapes, length))
    assert len(records) == 2
    for record in records:
        check_block_against_reference(record, "layer_norm2", siglip2_grids(shapes, length))


def test_siglip2_image_alone_equals_padded_batch_and_padding_never_leaks() -> None:
    model = random_mona("siglip2_vision")
    batch = naflex([(3, 5), (4, 4)], 20)
    with torch.no_grad():
        packed = model(**batch).last_hidden_state
        alone = model(**naflex([(3, 5)], 15)).last_hidden_state  # no padding at all
        same_pixels = {k: v[:1].clone() for k, v in batch.items()}
        alone_padded = model(**same_pixels).last_hidden_state
        noisy = dict(batch, pixel_values=batch["pixel_values"].clone())
        noisy["pixel_values"][0, 15:] = 100.0
        with_other_padding = model(**noisy).last_hidden_state
    first = naflex([(3, 5)], 15)["pixel_values"][0]
    assert torch.equal(first, batch["pixel_values"][0, :15])  # the same image in both runs
    torch.testing.assert_close(packed[0, :15], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:1, :15], alone_padded[:, :15], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_other_padding[:, :15], packed[:, :15], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_other_padding[1], packed[1], atol=1e-5, rtol=1e-5)


def test_siglip2_dual_encoder_adapts_vision_only_and_text_stays_bit_identical() -> None:
    base = build("siglip2_dual")
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_before = _tensors(base.get_text_features(input_ids=ids))
    with pytest.warns(UserWarning, match=r"skipped 2 block\(s\) of a text tower \(text_model\.encoder\.layers\.0"):
        model = get_peft_model(base, MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    model.eval()
    assert not any(".text_model." in n for n, p in model.named_parameters() if p.requires_grad)
    inputs = CASES["siglip2_dual"].inputs()
    with torch.no_grad():
        text_after = _tensors(model.get_text_features(input_ids=ids))
        out = model(**inputs)
        with model.disable_adapter():
            plain = model(**inputs)
    for key, value in text_before.items():
        assert torch.equal(text_after[key], value), key
    assert torch.equal(out.text_embeds, plain.text_embeds)
    assert (out.image_embeds - plain.image_embeds).abs().max() > 1e-3


def test_siglip2_mixed_adapter_batch_equals_each_adapter_alone() -> None:
    model = wrap(build("siglip2_vision"), init_weights=False, dropout=0.0)
    model.add_adapter("other", MonaConfig(bottleneck_dim=4, kernel_sizes=(3,), init_weights=False, dropout=0.0))
    randomize_adapter(model)
    model.eval()
    shapes = [(3, 5), (4, 4), (2, 3)]
    inputs = naflex(shapes, 20)
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(**inputs).last_hidden_state
            else:
                model.set_adapter(name)
                alone = model(**inputs).last_hidden_state
            valid = shapes[i][0] * shapes[i][1]
            torch.testing.assert_close(mixed[i, :valid], alone[i, :valid], atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3


def test_siglip2_without_spatial_shapes_or_with_a_grid_too_big_is_refused() -> None:
    model = random_mona("siglip2_vision")
    inputs = naflex([(4, 4)], 16)
    with pytest.raises(ValueError, match=r"without `spatial_shapes`.*each image's patch grid"):
        model(**dict(inputs, spatial_shapes=None))
    with pytest.raises(ValueError, match=r"image 0 has a 5x5 patch grid \(25 tokens\).*only 16 tokens"):
        model(**dict(inputs, spatial_shapes=torch.tensor([[5, 5]])))


# ------------------------------------------------------------------------------------------------------------- SAM
def test_sam_windowed_and_global_blocks_match_reference() -> None:
    model = random_mona("sam_vision")
    records = capture_blocks(model, sam_inputs(batch=2))
    assert [r["layer"].base_layer.window_size for r in records] == [4, 0]
    for record in records:
        assert record["out"].shape == (2, 8, 8, 32)
        check_block_against_reference(record, "layer_norm2", sam_grids(2, 8, 8))


def test_sam_with_point_and_box_prompts_trains_mona_and_the_mask_decoder() -> None:
    model = wrap(build("sam_model"), init_weights=False)
    randomize_adapter(model)
    model.train()
    out = model(**sam_inputs(), **sam_prompts())
    assert out.pred_masks.shape[:2] == (2, 1)
    (out.pred_masks.square().mean() + out.iou_scores.mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # the prompt encoder's mask embedding gets no gradient: no mask prompt is given
    unused = {n for n, g in grads.items() if g is None}
    assert unused and all(".prompt_encoder.modules_to_save.default.mask_embed." in n for n in unused)
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    mona = [n for n in grads if ".mona_" in n]
    assert mona and all(".vision_encoder.layers." in n for n in mona)
    assert any(".mona_attn.default.conv5." in n and grads[n].abs().sum() > 0 for n in mona)
    decoder = [n for n in grads if n.startswith("base_model.model.mask_decoder.modules_to_save.default.")]
    assert decoder and any(grads[n].abs().sum() > 0 for n in decoder)
    assert not any(".vision_encoder." in n and ".mona_" not in n for n in grads)  # the encoder itself is frozen


# -------------------------------------------------------------------------------------------------- Qwen2(.5)-VL
def _merged(out: Any) -> torch.Tensor:
    """The tower's merged tokens (one per 2x2 group, in merge order): 5.x's pooler_output, 4.57's return value."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_blocks_match_reference_in_the_true_2d_layout(version: str) -> None:
    name = "qwen2_tower" if version == "2" else "qwen2_5_tower"
    model = random_mona(name)
    records = capture_blocks(model, qwen_tower_inputs())
    grids = qwen_merge_index(QWEN_GRID) if version == "2" else qwen_window_index(QWEN_GRID)
    assert len(records) == 2 and len(grids) == 4  # two images and a video of two frames
    for record in records:
        check_block_against_reference(record, "norm2", grids)


def test_qwen2_5_window_order_is_the_one_transformers_uses() -> None:
    """The reference's window order (written from transformers' description) is the one the tower applies, and it
    is not the merge order for these grids: the test above really checks the window permutation."""
    tower = build("qwen2_5_tower")
    grid = torch.tensor(QWEN_GRID)
    if hasattr(tower, "get_window_index"):  # transformers 4.x
        index, _ = tower.get_window_index(grid)
    else:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid, spatial_merge_size=MERGE, window_size=QWEN_WINDOW, patch_size=PATCH)
    ours = qwen_window_order(QWEN_GRID, QWEN_WINDOW // MERGE // PATCH)
    assert index.tolist() == ours
    assert ours != sorted(ours)


@pytest.mark.parametrize("name", ["qwen2_tower", "qwen2_5_tower"])
def test_qwen_each_image_and_video_alone_equals_packed(name: str) -> None:
    model = random_mona(name)
    inputs = qwen_tower_inputs()
    with torch.no_grad():
        packed = _merged(model(**inputs))
        with model.disable_adapter():
            plain = _merged(model(**inputs))
    assert (packed - plain).abs().max() > 1e-2
    start, rows = 0, 0
    for t, h, w in QWEN_GRID:
        size = t * h * w
        alone_inputs = dict(
            hidden_states=inputs["hidden_states"][start : start + size], grid_thw=torch.tensor([[t, h, w]])
        )
        with torch.no_grad():
            alone = _merged(model(**alone_inputs))
        merged = size // (MERGE * MERGE)
        torch.testing.assert_close(packed[rows : rows + merged], alone, atol=1e-5, rtol=1e-5)
        start, rows = start + size, rows + merged


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_adapts_the_vision_tower_only(version: str) -> None:
    name = "qwen2_vl" if version == "2" else "qwen2_5_vl"
    model = wrap(build(name), init_weights=False)
    randomize_adapter(model)
    assert model.peft_config["default"].modules_to_save is None  # the language model is never a default head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".model.visual.blocks." in n and ".mona_" in n for n in trainable)
    language = model.base_model.model.model.language_model
    assert not any(isinstance(m, MonaLayer) for m in language.modules())
    # text without images never reaches the tower: bit-identical to the base model
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, text_only)
    model.train()
    logits = model(**qwen_vl_inputs()).logits
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(".mona_mlp.default.conv7." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_qwen_without_grid_or_with_a_grid_that_does_not_fit_is_refused() -> None:
    model = random_mona("qwen2_tower")
    inputs = qwen_tower_inputs()
    with pytest.raises(ValueError, match=r"called without `grid_thw`.*\(t, h, w\) patch grid"):
        model(hidden_states=inputs["hidden_states"])
    with pytest.raises(ValueError, match=r"shape \(50, 96\) but `grid_thw` .* describes 80 patches: expected \[80, "):
        model(hidden_states=inputs["hidden_states"][:50], grid_thw=inputs["grid_thw"])
    with pytest.raises(ValueError, match=r"4x5 patches is not divisible into 2x2 merge groups"):
        model(hidden_states=qwen_pixels([(1, 4, 5)]), grid_thw=torch.tensor([[1, 4, 5]]))


@pytest.mark.parametrize("name", ["qwen2_tower", "qwen2_vl"])
def test_qwen_mixed_adapter_batches_are_refused(name: str) -> None:
    model = random_mona(name)
    model.add_adapter("other", MonaConfig(bottleneck_dim=8))
    model.eval()
    inputs = CASES[name].inputs()
    images = len(inputs["grid_thw" if "grid_thw" in inputs else "image_grid_thw"])
    for names in (["default"] * images, ["default", "other"] + ["default"] * (images - 2)):
        with pytest.raises(ValueError, match=r"not supported on packed vision towers"):
            model(**inputs, adapter_names=names)
