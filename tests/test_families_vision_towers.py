"""The vision-tower families: DINOv3 (model and backbone), CLIP (vision model, with projection, dual encoder,
classifier, inside LLaVA), SigLIP (vision model, dual encoder, classifier), BEiT and Data2Vec-vision (layer scale,
relative position bias), and Depth Anything on a DINOv2 backbone.

For each: the blocks adapted by default (never a text tower's), the default task head, the token grid Mona filters
on (non-square, odd and interpolated sizes), prefix tokens, exact placement against a hand-written forward of one
block, identity at init, save/load, what a training step changes, and the refusals.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from mona_peft import MonaAdapter, MonaCheckpointError, MonaConfig, MonaLayer
from tiny_models import FAMILIES, randomize_adapter
from tiny_vision_towers import TF5, TOWERS, Tower, perturb_trainable, tensors

PREFIX = "base_model.model."


def _params(names: list[str]) -> list:
    return [pytest.param(name, id=name) for name in names]


ALL = _params(sorted(TOWERS))
WITH_PREFIX = _params(sorted(name for name, tower in TOWERS.items() if tower.num_prefix))
TEXT = _params(sorted(name for name, tower in TOWERS.items() if tower.text_blocks_skipped))


def _tower(name: str) -> Tower:
    tower = TOWERS[name]
    if tower.tf5_only and not TF5:
        pytest.skip(f"{name}: DINOv3ViTBackbone exists in transformers 5.x only")
    return tower


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    # tiny tensors: one thread is fastest, and the shared 2-core machine stays usable for others
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mona(tower: Tower, **config) -> nn.Module:
    """The tower with a non-identity Mona (random adapter weights, no dropout)."""
    model = get_peft_model(
        tower.build(),
        MonaConfig(bottleneck_dim=8, init_weights=False, dropout=0.0, **config),
        autocast_adapter_dtype=False,
    )
    randomize_adapter(model)
    return model


def _layers(model: nn.Module) -> list[tuple[str, MonaLayer]]:
    return [(name.removeprefix(PREFIX), m) for name, m in model.named_modules() if isinstance(m, MonaLayer)]


def _hooks(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


# -------------------------------------------------------------------------------------------- targets and heads
@pytest.mark.parametrize("name", ALL)
def test_default_targets_head_and_text_towers(name: str) -> None:
    tower = _tower(name)
    base = tower.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    layers = _layers(model)
    assert [path for path, _ in layers] == tower.blocks
    assert {type(layer.base_layer).__name__ for _, layer in layers} == {tower.block_class}
    config = model.peft_config["default"]
    assert config.modules_to_save == (list(tower.head) or None)
    skipped = [str(w.message) for w in caught if "text tower" in str(w.message)]
    if tower.text_tower is not None:
        assert not any(path.startswith(tower.text_tower + ".") for path, _ in layers)
        text = model.base_model.model.get_submodule(tower.text_tower)
        assert not any(isinstance(m, MonaLayer) for m in text.modules())
    if tower.text_blocks_skipped:
        assert len(skipped) == 1, skipped
        assert f"skipped {tower.text_blocks_skipped} block(s)" in skipped[0] and tower.text_tower in skipped[0]
    else:
        assert not skipped


@pytest.mark.parametrize("name", ALL)
def test_default_init_is_bit_identical(name: str) -> None:
    tower = _tower(name)
    base = tower.build()
    # get_peft_model freezes the base; frozen first here because SigLIP's attention-pooling head (torch's
    # MultiheadAttention) rounds differently (~4e-7) when its parameters require grad, with or without Mona.
    base.requires_grad_(False)
    inputs = [tower.inputs(size) for size in tower.sizes()]
    with torch.no_grad():
        expected = [tensors(base(**x)) for x in inputs]
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))
    assert len(_layers(model)) == 2
    with torch.no_grad():
        for x, want in zip(inputs, expected, strict=True):
            got = tensors(model(**x))
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ------------------------------------------------------------------------------------------------- token grid
@pytest.mark.parametrize("name", ALL)
def test_token_grid_and_prefix_count(name: str) -> None:
    tower = _tower(name)
    model = _mona(tower)
    seen: list[tuple] = []

    def record(module, args):
        x, grid, num_prefix = args
        seen.append((tuple(int(s) for s in grid), num_prefix, x.shape[1]))

    adapters = [m for m in model.modules() if isinstance(m, MonaAdapter)]
    assert len(adapters) == 4  # two blocks, two positions
    handles = [adapter.register_forward_pre_hook(record) for adapter in adapters]
    try:
        for height, width in tower.sizes():
            seen.clear()
            out = model(**tower.inputs((height, width), batch=3))
            grid = (height // 8, width // 8)
            assert seen == [(grid, tower.num_prefix, tower.num_prefix + grid[0] * grid[1])] * 4
            sum(t.float().square().mean() for t in tensors(out) if t.is_floating_point()).backward()
    finally:
        for handle in handles:
            handle.remove()
    # the depthwise filters of the first block get a gradient: they ran on the grid, on real activations
    first = _layers(model)[0][1].adapters_of("default")["attention"]
    assert first.conv5.weight.grad is not None and first.conv5.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", WITH_PREFIX)
def test_prefix_tokens_unchanged_leaves_them_bit_identical(name: str) -> None:
    tower = _tower(name)
    model = _mona(tower, prefix_tokens="unchanged")
    _, layer = _layers(model)[0]
    seen = {}
    handle = layer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out), with_kwargs=True
    )
    size = tower.odd_size or tower.sizes()[0]
    with torch.no_grad():
        model(**tower.inputs(size))
        bare = layer.base_layer(*seen["args"], **seen["kwargs"])  # the block alone: no Mona
    handle.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    bare = bare[0] if isinstance(bare, tuple) else bare
    p = tower.num_prefix
    assert torch.equal(out[:, :p], bare[:, :p])
    assert (out[:, p:] - bare[:, p:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- exact placement
def reference_mona(adapter: MonaAdapter, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Mona as the paper writes it, from the adapter's parameters only: x + up(gelu(z + proj(z))), z = y +
    mean_k(dwconv_k(y)) on the patch grid, y = down(LN(x) * s1 + x * s2)."""
    y = F.layer_norm(x, x.shape[-1:], adapter.norm.weight, adapter.norm.bias, adapter.norm.eps)
    y = F.linear(y * adapter.scale_norm + x * adapter.scale_skip, adapter.down.weight, adapter.down.bias)
    prefix, patches = y[:, :num_prefix], y[:, num_prefix:]
    b, n, m = patches.shape
    image = patches.reshape(b, *grid, m).permute(0, 3, 1, 2)
    convs = [getattr(adapter, f"conv{k}") for k in adapter.kernel_sizes]
    filtered = image + sum(F.conv2d(image, c.weight, c.bias, padding=c.padding, groups=m) for c in convs) / len(convs)
    z = torch.cat([prefix, filtered.permute(0, 2, 3, 1).reshape(b, n, m)], dim=1)
    z = z + F.linear(z, adapter.proj.weight.flatten(1), adapter.proj.bias)
    return x + F.linear(F.gelu(z), adapter.up.weight, adapter.up.bias)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _dinov3_block(block, x, kwargs, mona1, mona2):
    attention = _first(block.attention(block.norm1(x), position_embeddings=kwargs["position_embeddings"]))
    x1 = mona1(x + block.drop_path(block.layer_scale1(attention)))  # the residual AND the input of norm2
    return mona2(x1 + block.drop_path(block.layer_scale2(block.mlp(block.norm2(x1)))))


def _clip_block(block, x, kwargs, mona1, mona2):  # CLIP and SigLIP: pre-norm, no layer scale
    x1 = mona1(x + _first(block.self_attn(hidden_states=block.layer_norm1(x))))
    return mona2(x1 + block.mlp(block.layer_norm2(x1)))


def _beit_block(block, x, kwargs, mona1, mona2, x1):
    # x1 (attention with relative position bias, times lambda_1, plus x) is read from the bare block; by hand from
    # here on: the MLP branch, its dropout and lambda_2, then drop_path, with Mona around them
    x1 = mona1(x1)
    h = block.layernorm_after(x1)
    h = block.dropout(block.mlp(h)) if hasattr(block, "mlp") else block.output(block.intermediate(h))  # 5.x / 4.57
    assert isinstance(block.lambda_2, nn.Parameter)  # layer scale is on in these configs
    return mona2(x1 + block.drop_path(block.lambda_2 * h))


def _beit_x1(block, args, kwargs) -> torch.Tensor:
    """x + lambda_1 * attention(...): the bare block's output with its MLP branch (drop_path's 2nd call) zeroed."""
    calls = []

    def silence(module, inputs, output):
        calls.append(1)
        return torch.zeros_like(output) if len(calls) == 2 else None

    handle = block.drop_path.register_forward_hook(silence)
    try:
        return _first(block(*args, **kwargs))
    finally:
        handle.remove()


REFERENCE = {
    "dinov3": _dinov3_block,
    "clip_vision": _clip_block,
    "llava": _clip_block,
    "siglip_vision": _clip_block,
    "beit": _beit_block,
    "data2vec_vision": _beit_block,
}


@pytest.mark.parametrize("name", _params(sorted(REFERENCE)))
@pytest.mark.parametrize("index", [0, 1])
def test_block_matches_hand_written_reference(name: str, index: int) -> None:
    tower = _tower(name)
    model = _mona(tower)
    _, layer = _layers(model)[index]
    block = layer.base_layer
    seen = {}
    handle = layer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out), with_kwargs=True
    )
    size = tower.odd_size or tower.sizes()[0]
    with torch.no_grad():
        model(**tower.inputs(size))
    handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    grid, p = (size[0] // 8, size[1] // 8), tower.num_prefix
    adapters = layer.adapters_of("default")

    def mona1(x):
        return reference_mona(adapters["attention"], x, grid, p)

    def mona2(x):
        return reference_mona(adapters["mlp"], x, grid, p)

    with torch.no_grad():
        if REFERENCE[name] is _beit_block:
            x1 = _beit_x1(block, args, kwargs)
            expected = _beit_block(block, args[0], kwargs, mona1, mona2, x1)
        else:
            expected = REFERENCE[name](block, args[0], kwargs, mona1, mona2)
        bare = _first(block(*args, **kwargs))
    out = _first(seen["out"])
    assert out.shape == expected.shape == args[0].shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - bare).abs().max() > 1e-2  # Mona really changed the block (not two no-ops compared)


# ------------------------------------------------------------------------------------------- saving and training
@pytest.mark.parametrize("name", ALL)
def test_save_and_reload_is_bit_identical(name: str, tmp_path) -> None:
    tower = _tower(name)
    model = get_peft_model(tower.build(), MonaConfig(bottleneck_dim=8, init_weights=False))
    perturb_trainable(model)  # Mona and the head, so that the reload has to restore both
    model.eval()
    inputs = [tower.inputs(size) for size in tower.sizes()]
    with torch.no_grad():
        expected = [tensors(model(**x)) for x in inputs]
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    mona_blocks = sorted({k.removeprefix(PREFIX).split(".mona_")[0] for k in keys if ".mona_" in k})
    assert mona_blocks == tower.hub_blocks  # the Hub's spelling of the blocks, on every line
    for head in tower.head:
        assert any(k.removeprefix(PREFIX).startswith(head + ".") for k in keys), head
    if not tower.head:
        assert all(".mona_" in k for k in keys)

    reloaded = PeftModel.from_pretrained(tower.build(), tmp_path).eval()
    with torch.no_grad():
        for x, want in zip(inputs, expected, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(tensors(reloaded(**x)), want, strict=True))


@pytest.mark.parametrize("name", ALL)
def test_training_step_changes_only_mona_and_the_head(name: str) -> None:
    tower = _tower(name)
    model = get_peft_model(tower.build(), MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    # Adam: moves every parameter with a non-zero gradient, however small (Depth Anything's random head is tiny)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**tower.inputs())
    sum(t.float().square().mean() for t in tensors(out) if t.is_floating_point()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert all(".mona_" in n or ".modules_to_save.default." in n for n in trainable)
    assert any(".mona_" in n for n in changed)
    for head in tower.head:
        assert any(n.startswith(f"{PREFIX}{head}.modules_to_save.default.") for n in changed), head
    if tower.text_tower is not None:
        assert not any(n.startswith(f"{PREFIX}{tower.text_tower}.") for n in changed)


@pytest.mark.parametrize("name", TEXT)
def test_dual_encoder_text_side_is_bit_identical_after_training(name: str) -> None:
    tower = _tower(name)
    base = tower.build()
    inputs = tower.inputs()
    with torch.no_grad():
        reference = base(**inputs)
    with pytest.warns(UserWarning, match=r"skipped 2 block\(s\) of a text tower \(text_model"):
        model = get_peft_model(base, MonaConfig(bottleneck_dim=8, init_weights=False))
    randomize_adapter(model)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(**inputs)
        (out.logits_per_image.square().mean() + out.image_embeds.square().mean()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**inputs)
    assert torch.equal(after.text_embeds, reference.text_embeds)
    assert torch.equal(after.text_model_output.last_hidden_state, reference.text_model_output.last_hidden_state)
    assert (after.image_embeds - reference.image_embeds).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------- refusals
def _vit_classifier() -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES["vit"].build()


SOURCES = {"vit": _vit_classifier, **{name: tower.build for name, tower in TOWERS.items()}}
# Pairs of families. CLIP's and SigLIP's towers of the same width have the same block paths and adapter shapes: only
# the block family saved in adapter_config.json tells them apart.
MISMATCHES = [
    ("clip_vision", "siglip_vision"),
    ("siglip_vision", "clip_vision"),
    ("vit", "clip_vision"),
    ("clip_vision", "dinov3"),
    ("dinov3", "siglip_vision"),
    ("beit", "data2vec_vision"),
    ("siglip_vision", "beit"),
    ("clip_vision_projection", "llava"),
]


@pytest.mark.parametrize(("source", "target"), [pytest.param(s, t, id=f"{s}-onto-{t}") for s, t in MISMATCHES])
@pytest.mark.parametrize("targets", ["default", "any_numbered_layer"])
def test_adapter_of_another_family_is_refused_and_the_model_kept(source, target, targets, tmp_path) -> None:
    # "default": the saved target_modules name the source's blocks and match nothing in the target model;
    # "any_numbered_layer": they match the target's (vision) blocks too, and the weights (other block paths) are
    # refused.
    target_modules = None if targets == "default" else r"(?!model\.language_model\.)(.*\.)?(layer|layers)\.\d+"
    if source in TOWERS:
        _tower(source)
    _tower(target)
    trained = get_peft_model(
        SOURCES[source](), MonaConfig(bottleneck_dim=8, init_weights=False, target_modules=target_modules)
    )
    trained.save_pretrained(tmp_path)

    tower = TOWERS[target]
    base = tower.build()
    inputs = tower.inputs()
    with torch.no_grad():
        expected = tensors(base(**inputs))
    modules = [(name, type(m)) for name, m in base.named_modules()]
    hooks = _hooks(base)
    error = ValueError if targets == "default" else MonaCheckpointError
    with pytest.raises(error, match="match no module|another architecture"):
        PeftModel.from_pretrained(base, tmp_path)
    assert [(name, type(m)) for name, m in base.named_modules()] == modules
    assert _hooks(base) == hooks
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(tensors(base(**inputs)), expected, strict=True))


@pytest.mark.parametrize("name", TEXT)
@pytest.mark.parametrize(
    "target_modules",
    [["text_model.encoder.layers.0"], r".*encoder\.layers\.\d+"],
    ids=["text-block", "both-towers"],
)
def test_targeting_a_text_tower_block_raises(name: str, target_modules) -> None:
    tower = _tower(name)
    base = tower.build()
    modules = [(n, type(m)) for n, m in base.named_modules()]
    hooks = _hooks(base)
    with pytest.raises(ValueError, match=r"text_model\.encoder\.layers\.0', a block of a text tower"):
        get_peft_model(base, MonaConfig(bottleneck_dim=8, target_modules=target_modules))
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    assert _hooks(base) == hooks


def test_llava_language_model_blocks_are_not_targets() -> None:
    tower = TOWERS["llava"]
    base = tower.build()
    with pytest.raises(ValueError, match="wraps whole transformer blocks.*LlamaDecoderLayer"):
        get_peft_model(base, MonaConfig(target_modules=r"model\.language_model\.layers\.\d+"))
    assert not any(isinstance(m, MonaLayer) for m in base.modules())


def test_a_load_refused_at_the_weights_restores_requires_grad(tmp_path) -> None:
    trained = get_peft_model(
        _vit_classifier(), MonaConfig(bottleneck_dim=8, target_modules=r"(.*\.)?(layer|layers)\.\d+")
    )
    trained.save_pretrained(tmp_path)
    base = TOWERS["clip_vision"].build()
    with pytest.raises(MonaCheckpointError, match="another architecture"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(p.requires_grad for p in base.parameters())
