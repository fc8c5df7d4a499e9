"""Mona on Swin backbones inside dense-prediction models: UperNet (semantic segmentation) and Mask2Former.

Mona goes into every block of the Swin backbone and nowhere else; the task head is trained in full through
``modules_to_save``, chosen by default per model (see ``mona_peft.heads``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from PIL import Image
from safetensors.torch import load_file

from mona_peft import MonaConfig, MonaLayer
from mona_peft.heads import task_head_modules
from mona_peft.metrics import MEAN_IOU_PATH, load_mean_iou
from mona_peft.training import DataError, OutputDirError
from mona_peft.training.segmentation import (
    SCENE_LABELS,
    SegmentationDataArguments,
    SegmentationPreprocessing,
    draw_scene,
    load_trained_segmenter,
    parse_segmentation_args,
    prepare_segmentation_data,
    scene_dataset,
)
from mona_peft.training.segmentation import main as segmentation_main
from mona_peft.training.segmentation.arguments import SEGMENTATION_LEARNING_RATES
from tiny_models import FAMILIES, mask2former_swin, randomize_adapter, upernet_swin
from training_helpers import REPO, one_thread, run_script  # noqa: F401  (one_thread: autouse)

SEGMENTATION_SCRIPT = REPO / "scripts" / "train_segmentation.py"

UPERNET_HEADS = ["decode_head", "auxiliary_head"]
MASK2FORMER_HEADS = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]


def _blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "SwinLayer"}


def _trainable_owners(model: torch.nn.Module) -> set[str]:
    """What each trainable parameter belongs to: 'mona' or the head module wrapped by modules_to_save."""
    owners = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".mona_" in name:
            owners.add("mona")
        elif ".modules_to_save.default." in name:
            owners.add(name.removeprefix("base_model.model.").split(".modules_to_save.")[0])
        else:
            owners.add(name)
    return owners


@torch.no_grad()
def _perturb_heads(model: torch.nn.Module, seed: int = 1) -> None:
    """Change the trained copies of the head, so that a round trip that lost them would show."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".modules_to_save.default." in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


# -------------------------------------------------------------------------------------------------- UperNet + Swin
def test_upernet_mona_in_every_backbone_block_and_nowhere_else() -> None:
    base = upernet_swin()
    block_names = sorted(_blocks(base))
    assert len(block_names) == 4  # depths 1 + 2 + 1
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8))

    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MonaLayer)}
    assert sorted(wrapped) == block_names
    assert all(name.startswith("backbone.") for name in wrapped)
    mona_params = [n for n, _ in model.named_parameters() if ".mona_" in n]
    assert mona_params and all(".backbone." in n for n in mona_params)
    assert not any(".mona_" in n for n, _ in model.base_model.model.decode_head.named_parameters())


def test_upernet_feature_pyramid_keeps_the_bottleneck_at_every_stage() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    shapes = {
        tuple(layer.mona_attn["default"].down.weight.shape)
        for layer in model.modules()
        if isinstance(layer, MonaLayer)
    }
    # Swin stage widths 16, 32, 64 (embed_dim doubles at each patch merging); the bottleneck stays 8.
    assert shapes == {(8, 16), (8, 32), (8, 64)}


def test_upernet_default_head_is_trainable_and_the_rest_frozen() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == UPERNET_HEADS
    assert _trainable_owners(model) == {"mona", *UPERNET_HEADS}
    inner = model.base_model.model
    for head in UPERNET_HEADS:
        wrapper = getattr(inner, head)
        assert isinstance(wrapper, ModulesToSaveWrapper)
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    # The backbone's own parameters (embeddings, norms, relative-position tables, output norms) stay frozen.
    frozen = [n for n, p in inner.backbone.named_parameters() if ".mona_" not in n]
    assert frozen and not any(p.requires_grad for n, p in inner.backbone.named_parameters() if ".mona_" not in n)


def test_upernet_without_auxiliary_head() -> None:
    model = get_peft_model(upernet_swin(auxiliary_head=False), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == ["decode_head"]


@pytest.mark.parametrize(
    ("given", "expected"), [(["decode_head"], {"mona", "decode_head"}), ([], {"mona"})], ids=["decode-only", "none"]
)
def test_explicit_modules_to_save_wins(given: list[str], expected: set[str]) -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8, modules_to_save=given))
    assert model.peft_config["default"].modules_to_save == given
    assert _trainable_owners(model) == expected


def test_upernet_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8)).eval()
    randomize_adapter(model)
    _perturb_heads(model)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # non-square: grids per stage
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        with model.disable_adapter():
            assert not torch.allclose(model(pixel_values=pixels).logits, expected)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == UPERNET_HEADS
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    owners = {"mona" if ".mona_" in k else k.removeprefix("base_model.model.").split(".")[0] for k in keys}
    assert owners == {"mona", *UPERNET_HEADS}
    assert all(".backbone." in k for k in keys if ".mona_" in k)

    loaded = PeftModel.from_pretrained(upernet_swin(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, expected)


def test_upernet_training_steps_reduce_the_loss() -> None:
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8))
    model.train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    labels[:, 20:, :] = 2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # Gradients reached the Mona modules of every stage, not only the head.
    for layer in model.modules():
        if isinstance(layer, MonaLayer):
            assert layer.mona_mlp["default"].up.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- Mask2Former + Swin
def _mask2former_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.class_queries_logits, out.masks_queries_logits


@pytest.fixture
def scipy_available() -> None:
    pytest.importorskip("scipy", reason="transformers' Mask2Former needs scipy (pip install scipy)")


@pytest.mark.usefixtures("scipy_available")
def test_mask2former_wraps_the_backbone_and_trains_the_rest(tmp_path: Path) -> None:
    base = mask2former_swin()
    block_names = sorted(_blocks(base))
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8)).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MonaLayer))
    assert wrapped == block_names and len(wrapped) == 4
    assert all(n.startswith("model.pixel_level_module.encoder.") for n in wrapped)
    assert model.peft_config["default"].modules_to_save == MASK2FORMER_HEADS
    assert _trainable_owners(model) == {"mona", *MASK2FORMER_HEADS}

    randomize_adapter(model)
    _perturb_heads(model)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _mask2former_outputs(model, pixels)
    model.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in keys if ".mona_" not in k and not any(f".{h}." in k for h in MASK2FORMER_HEADS)]

    loaded = PeftModel.from_pretrained(mask2former_swin(), tmp_path).eval()
    for got, want in zip(_mask2former_outputs(loaded, pixels), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.usefixtures("scipy_available")
def test_mask2former_loss_trains_only_mona_and_head() -> None:
    model = get_peft_model(mask2former_swin(), MonaConfig(bottleneck_dim=8))
    model.train()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    out = model(pixel_values=pixels, mask_labels=[masks], class_labels=[torch.tensor([0, 2])])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".mona_" in n for n in with_grad)
    assert all(".mona_" in n or ".modules_to_save.default." in n for n in with_grad)


# ---------------------------------------------------------------------------------------------- default heads
@pytest.mark.parametrize(
    ("family", "expected"),
    [("vit", ["classifier"]), ("swin", ["classifier"]), ("deit", ["cls_classifier", "distillation_classifier"])],
)
def test_image_classifiers_default_to_their_classifier(family: str, expected: list[str]) -> None:
    model = get_peft_model(FAMILIES[family].build(), MonaConfig(bottleneck_dim=8))
    assert model.peft_config["default"].modules_to_save == expected
    assert _trainable_owners(model) == {"mona", *expected}


def test_bare_backbones_have_no_head() -> None:
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2])
    for bare in (transformers.SwinModel(config), transformers.SwinBackbone(config)):
        model = get_peft_model(bare, MonaConfig(bottleneck_dim=8))
        assert model.peft_config["default"].modules_to_save is None
        assert _trainable_owners(model) == {"mona"}


def test_unfamiliar_models_get_no_guess() -> None:
    class Custom(torch.nn.Module):  # Swin blocks not inside a transformers Swin model
        def __init__(self) -> None:
            super().__init__()
            swin = transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1], num_heads=[2]))
            self.stages = swin.encoder.layers
            self.head = torch.nn.Linear(16, 2)

    model = Custom()
    blocks = [n for n in _blocks(model)]
    assert task_head_modules(model, blocks) is None


def test_loading_follows_the_saved_config_not_the_default(tmp_path: Path) -> None:
    """A saved adapter whose config has no head (e.g. saved before heads became the default) loads without one."""
    model = get_peft_model(upernet_swin(), MonaConfig(bottleneck_dim=8, modules_to_save=[]))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = None
    config_file.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(upernet_swin(), tmp_path)
    assert not loaded.peft_config["default"].modules_to_save  # no head, as saved
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in loaded.modules())


# ------------------------------------------------------------------------------------------------------ mean IoU
# Two images, classes 0-2, 255 = ignored. Counted pixels: 5 in the first image, 4 in the second.
#   class 0: intersection 3, predicted 4, reference 4 -> union 5, IoU 3/5, accuracy 3/4
#   class 1: intersection 2, predicted 2, reference 3 -> union 3, IoU 2/3, accuracy 2/3
#   class 2: intersection 2, predicted 3, reference 2 -> union 3, IoU 2/3, accuracy 1
# (the ignored pixel's prediction, class 2, does not count). Overall accuracy 7/9.
HAND_PREDICTIONS = [np.array([[0, 0, 1], [1, 2, 2]]), np.array([[2, 2], [0, 0]])]
HAND_REFERENCES = [np.array([[0, 1, 1], [1, 2, 255]]), np.array([[2, 0], [0, 0]])]


def test_mean_iou_on_a_hand_made_example() -> None:
    import evaluate

    metric = evaluate.load(MEAN_IOU_PATH, keep_in_memory=True)
    result = metric.compute(predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=3, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [3 / 5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result["per_category_accuracy"], [3 / 4, 2 / 3, 1.0])
    assert result["mean_iou"] == pytest.approx((3 / 5 + 2 / 3 + 2 / 3) / 3)
    assert result["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    assert result["overall_accuracy"] == pytest.approx(7 / 9)


def test_mean_iou_leaves_absent_classes_out_of_the_mean() -> None:
    result = load_mean_iou().compute(
        predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=4, ignore_index=255
    )
    assert np.isnan(result["per_category_iou"][3]) and np.isnan(result["per_category_accuracy"][3])
    assert result["mean_iou"] == pytest.approx((3 / 5 + 2 / 3 + 2 / 3) / 3)
    filled = load_mean_iou().compute(
        predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=4, ignore_index=255, nan_to_num=0.0
    )
    assert filled["per_category_iou"][3] == 0.0


def test_mean_iou_reduce_labels_and_bad_input() -> None:
    metric = load_mean_iou()
    # reduce_labels: reference 0 is ignored and 1..3 become 0..2, i.e. the hand-made references again.
    shifted = [np.where(r == 255, 0, r + 1) for r in HAND_REFERENCES]
    reduced = metric.compute(
        predictions=HAND_PREDICTIONS, references=shifted, num_labels=3, ignore_index=255, reduce_labels=True
    )
    assert reduced["mean_iou"] == pytest.approx((3 / 5 + 2 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=HAND_PREDICTIONS, references=HAND_REFERENCES, num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match="same shape"):
        metric.compute(predictions=[np.zeros((2, 2))], references=[np.zeros((2, 3))], num_labels=2, ignore_index=255)


# --------------------------------------------------------------------------------------------------------- data
def test_generated_scenes_are_reproducible() -> None:
    first = scene_dataset(4, seed=3)
    again = scene_dataset(6, seed=3)
    for i in range(4):
        assert np.array_equal(np.asarray(first[i]["image"]), np.asarray(again[i]["image"]))
        assert np.array_equal(np.asarray(first[i]["label"]), np.asarray(again[i]["label"]))
    other = scene_dataset(1, seed=4)
    assert not np.array_equal(np.asarray(other[0]["image"]), np.asarray(first[0]["image"]))
    masks = np.stack([np.asarray(m) for m in again["label"]])
    assert masks.shape[1:] == np.asarray(again[0]["image"]).shape[:2]
    assert set(np.unique(masks)) <= set(range(len(SCENE_LABELS))) and len(np.unique(masks)) > 1


def write_pairs(root: Path, count: int = 12, size: int = 40, seed: int = 0) -> Path:
    """An image/mask folder (images/NNN.png, masks/NNN.png) of generated scenes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = draw_scene(np.random.default_rng([seed, i]), size)
        image.save(root / "images" / f"{i:03d}.png")
        mask.save(root / "masks" / f"{i:03d}.png")
    return root


def _data_args(**kwargs: object) -> SegmentationDataArguments:
    return SegmentationDataArguments(**kwargs)


def test_folder_pairs_load_and_split(tmp_path: Path) -> None:
    data = prepare_segmentation_data(_data_args(train_dir=str(write_pairs(tmp_path / "d", count=20))))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 15, "validation": 2, "test": 3}
    assert data.labels == ["0", "1", "2", "3"]  # from the largest mask value
    named = prepare_segmentation_data(
        _data_args(train_dir=str(tmp_path / "d"), class_names="background,disc,box,triangle")
    )
    assert named.labels == list(SCENE_LABELS)


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "d")
    Image.new("L", (39, 40)).save(root / "masks" / "005.png")
    with pytest.raises(DataError, match=r"005.png\) is 39x40 pixels but its image is 40x40"):
        prepare_segmentation_data(_data_args(train_dir=str(root)))


def test_mask_values_beyond_the_classes_are_refused(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "d")
    with pytest.raises(DataError, match=r"masks/\d+\.png\) has class value\(s\) \[(2|3|2, 3)\] outside 0..1"):
        prepare_segmentation_data(_data_args(train_dir=str(root), class_names="background,disc"))
    # Pixels marked with the ignore index are fine.
    mask = np.asarray(Image.open(root / "masks" / "000.png")).copy()
    mask[:4] = 255
    Image.fromarray(mask).save(root / "masks" / "000.png")
    data = prepare_segmentation_data(_data_args(train_dir=str(root), class_names="b,d,x,t"))
    assert len(data.labels) == 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("rgb_mask", "colour \\(RGB\\) image"),
        ("unpaired", "do not pair up by file name"),
        ("no_masks", "has no 'masks' sub-folder"),
        ("one_class", "at least two classes"),
    ],
)
def test_bad_folders_are_refused(tmp_path: Path, damage: str, message: str) -> None:
    root = write_pairs(tmp_path / "d")
    if damage == "rgb_mask":
        Image.open(root / "masks" / "003.png").convert("RGB").save(root / "masks" / "003.png")
    elif damage == "unpaired":
        (root / "masks" / "004.png").unlink()
    elif damage == "no_masks":
        shutil.rmtree(root / "masks")
    else:
        for path in (root / "masks").iterdir():
            Image.new("L", (40, 40), 0).save(path)
    with pytest.raises(DataError, match=message):
        prepare_segmentation_data(_data_args(train_dir=str(root)))


def test_dataset_without_a_mask_column_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "plain"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / f"{i}.png")
    with pytest.raises(DataError, match="Cannot find the mask \\(label\\) column"):
        prepare_segmentation_data(_data_args(dataset_name=str(images)))
    with pytest.raises(DataError, match="no mask \\(label\\) column 'seg'"):
        prepare_segmentation_data(_data_args(dataset_name=str(images), label_column_name="seg"))


def test_joint_augmentation_keeps_image_and_mask_aligned() -> None:
    # An image whose red channel encodes the class: after crop, resize and flip the mask must still match it.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(4, 5)).repeat(10, axis=0).repeat(10, axis=1)
    image = Image.fromarray(np.stack([labels * 100, labels * 0, labels * 0], axis=-1).astype(np.uint8))
    prep = SegmentationPreprocessing(24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_crop_scale=0.3)
    for seed in range(6):
        pixels, mask = prep.train_pair(image, Image.fromarray(labels.astype(np.uint8)), random.Random(seed))
        red = torch.round(pixels[0] * 255 / 100)
        agree = (red == mask.float()).float().mean().item()
        assert agree > 0.85, (seed, agree)  # only edges may differ: bilinear image vs nearest mask
        assert (red == mask.flip(-1).float()).float().mean().item() < agree - 0.2  # a lone flip would show
    pixels, mask = prep.eval_pair(image, Image.fromarray(labels.astype(np.uint8)))
    assert pixels.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.long


# ------------------------------------------------------------------------------------------------- training runs
def make_tiny_swin(directory: Path, with_processor: bool = True) -> Path:
    """A tiny random Swin checkpoint (three stages, widths 16/32/64), like a pretrained backbone on disk."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=2
    )
    transformers.SwinModel(config, add_pooling_layer=False).save_pretrained(directory)
    if with_processor:
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_swin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_swin(tmp_path_factory.mktemp("tiny-swin"))


@pytest.fixture(scope="module")
def pair_folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"), count=24, size=40)


def tiny_segmentation_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--train_dir", str(data),
        "--output_dir", str(output),
        "--image_size", "32",
        "--bottleneck_dim", "8",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_steps", "3",
        "--class_names", ",".join(SCENE_LABELS),
        *extra,
    ]  # fmt: skip


def test_parse_segmentation_defaults() -> None:
    model_args, data_args, training_args = parse_segmentation_args([])
    assert model_args.method == "mona" and model_args.model_name_or_path is None
    assert training_args.learning_rate == SEGMENTATION_LEARNING_RATES["mona"]
    assert training_args.output_dir == os.path.join("outputs", "seg-mona-swin-mini-random-scenes")
    assert data_args.image_size == 64 and data_args.ignore_index == 255 and not data_args.reduce_labels
    assert training_args.weight_decay == 0.05 and training_args.max_grad_norm == 5.0  # the shared recipe
    _, _, full = parse_segmentation_args(["--method", "full", "--learning_rate", "1e-4"])
    assert full.learning_rate == 1e-4
    with pytest.raises(SystemExit):
        parse_segmentation_args(["--method", "linear"])


@pytest.mark.parametrize("method", ["mona", "lora", "full"])
def test_methods_train_and_reload(method: str, tiny_swin: Path, pair_folder_data: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    result = segmentation_main(tiny_segmentation_args(tiny_swin, pair_folder_data, out, "--method", method))
    assert 0 <= result.metrics["test_mean_iou"] <= 1 and result.metrics["test_samples"] == 4
    model = result.trainer.model.eval()
    owners = _trainable_owners(model)
    if method == "mona":
        assert owners == {"mona", *UPERNET_HEADS}
    elif method == "lora":
        lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        assert lora and all(".backbone." in n for n in lora)
    else:
        assert all(p.requires_grad for p in model.parameters())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reloaded = load_trained_segmenter(out)
    with torch.no_grad():
        expected, got = model(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits
    if method == "full":
        trained, loaded = model.state_dict(), reloaded.state_dict()
        assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
        # The same weights bit for bit, but from_pretrained leaves them at other memory alignments, and oneDNN's
        # kernels then round differently (measured: 8e-9 on these logits).
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, expected)
    with pytest.raises(OutputDirError, match="already holds a trained model"):
        segmentation_main(tiny_segmentation_args(tiny_swin, pair_folder_data, out, "--method", method))


@pytest.mark.slow  # ~25 s, most of it starting a fresh Python; test_methods_train_and_reload runs the same in-process
def test_cli_end_to_end_on_a_tiny_config(tmp_path: Path, pair_folder_data: Path) -> None:
    model = make_tiny_swin(tmp_path / "swin", with_processor=False)  # no processor: ImageNet statistics
    out = tmp_path / "run"
    result = run_script([str(SEGMENTATION_SCRIPT), *tiny_segmentation_args(model, pair_folder_data, out)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "normalising with the ImageNet mean and std" in result.stdout
    assert "Held-out test mean IoU:" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "segmentation.json",
                 "results.json", "README.md", "training_curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MONA" and config["modules_to_save"] == UPERNET_HEADS
    keys = list(load_file(out / "adapter_model.safetensors"))
    assert {k.split(".")[2] for k in keys if ".mona_" not in k} == set(UPERNET_HEADS)
    assert all(".backbone." in k for k in keys if ".mona_" in k)
    metrics = json.loads((out / "results.json").read_text())
    assert f"{metrics['test_mean_iou']:.4f}" in result.stdout
    assert json.loads((out / "config.json").read_text())["id2label"]["3"] == "triangle"
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "mean_iou" in card and "| test (held out) | 4 |" in card


def test_bad_data_is_a_clean_cli_error(tmp_path: Path, tiny_swin: Path) -> None:
    root = write_pairs(tmp_path / "d", count=6)
    Image.new("L", (20, 20)).save(root / "masks" / "002.png")
    result = run_script([str(SEGMENTATION_SCRIPT), *tiny_segmentation_args(tiny_swin, root, tmp_path / "o")])
    assert result.returncode != 0
    assert "error: The mask of" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_no_argument_run_shortened(tmp_path: Path) -> None:
    """The documented default (random small Swin, generated scenes), cut to two steps."""
    out = tmp_path / "default"
    result = run_script([str(SEGMENTATION_SCRIPT), "--output_dir", str(out), "--max_steps", "2"], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "600 procedurally generated scenes" in result.stdout
    assert "train 450, validation 60, test 90 images" in result.stdout
    assert "Held-out test mean IoU:" in result.stdout
    meta = json.loads((out / "segmentation.json").read_text())
    assert meta["random_backbone"] is True and meta["labels"] == list(SCENE_LABELS)
    assert "randomly initialised weights" in (out / "README.md").read_text()


def test_readme_segmentation_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Semantic segmentation") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the example is ours
    assert namespace["output"].logits.shape == (2, 4, 64, 64) and namespace["output"].loss.ndim == 0
    model, reloaded = namespace["model"].eval(), namespace["reloaded"].eval()
    assert reloaded.peft_config["default"].modules_to_save == UPERNET_HEADS
    with torch.no_grad():
        pixels = namespace["pixel_values"]
        assert torch.equal(model(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits)


def test_swin_checkpoint_weights_become_the_backbone(tiny_swin: Path) -> None:
    from mona_peft.training.segmentation import SegmentationModelArguments, load_segmenter

    model = load_segmenter(SegmentationModelArguments(model_name_or_path=str(tiny_swin)), ["a", "b", "c"], 255)
    reference = transformers.SwinModel.from_pretrained(tiny_swin).state_dict()
    loaded = {k.removeprefix("swin."): v for k, v in model.backbone.state_dict().items()}
    weights = [k for k in reference if k in loaded and "relative_position_index" not in k]
    assert len(weights) > 20 and all(torch.equal(loaded[k], reference[k]) for k in weights)
    assert model.config.num_labels == 3 and model.config.loss_ignore_index == 255
    assert model.decode_head.classifier.out_channels == 3


def test_undecodable_pairs_are_named(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "d")
    (root / "images" / "007.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Cannot decode the image or mask of .*007.png"):
        prepare_segmentation_data(_data_args(train_dir=str(root)))
