"""scripts/train.py and mona_peft.training: the CLI end to end on a tiny model, the recipe's pieces, bad input.

The end-to-end runs use a tiny random DINOv2/ViT saved to a temp dir (``--model_name_or_path``) and a small PIL-made
image folder (``--train_dir``), so nothing is downloaded and each run takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mona_peft.metrics import ACCURACY_PATH, load_accuracy
from mona_peft.training import (
    DataArguments,
    DataError,
    ModelArguments,
    ModelError,
    OutputDirError,
    Preprocessing,
    RecipeTrainer,
    TaskDataset,
    apply_method,
    build_model,
    decay_parameter_names,
    load_trained,
    parse_args,
    prepare_data,
    train,
)
from mona_peft.training.arguments import DEFAULT_HEAD_LEARNING_RATE, DEFAULT_LEARNING_RATES, DEFAULT_MAX_STEPS
from mona_peft.training.data import make_collator
from mona_peft.training.recipe import decays, forward_kwargs, load_image_processor
from training_helpers import TRAIN_SCRIPT, make_image_folder, make_tiny_checkpoint, run_script, tiny_train_args


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dinov2"), "dinov2")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("vit"), "vit")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _front_matter(readme: str) -> str:
    assert readme.startswith("---\n")
    return readme.split("---\n")[1]


# ---------------------------------------------------------------------------------------------------------------------
# The command line, end to end


def test_cli_trains_evaluates_and_saves_an_adapter(tiny_dinov2: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_script([str(TRAIN_SCRIPT), *tiny_train_args(tiny_dinov2, image_folder, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Held-out test accuracy:" in result.stdout

    # Adapter only: Mona weights and the head (modules_to_save), nothing of the frozen backbone.
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(".mona_" in k or ".classifier." in k for k in weights)
    assert any(".classifier." in k for k in weights)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MONA" and adapter_config["modules_to_save"] == ["classifier"]
    assert adapter_config["bottleneck_dim"] == 8
    assert not (out / "model.safetensors").exists()

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "stripes"}
    assert config["label2id"] == {"circle": 0, "square": 1, "stripes": 2}
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}

    readme = (out / "README.md").read_text()
    meta = _front_matter(readme)
    assert "library_name: peft" in meta and "- accuracy" in meta
    assert "- mona" in meta and "- peft" in meta
    body = readme.split("---\n", 2)[2]
    assert body.index("import mona_peft") < body.index("from peft import PeftModel")
    assert (out / "training_curves.png").stat().st_size > 10_000

    test_metrics = json.loads((out / "test_results.json").read_text())
    assert 0 <= test_metrics["test_accuracy"] <= 1
    assert f"{test_metrics['test_accuracy']:.4f}" in result.stdout

    # Reloaded in a fresh model, the adapter reproduces the test loss the run reported.
    classifier = load_trained(out)
    data = prepare_data(DataArguments(train_dir=str(image_folder), image_size=32))
    test = data.splits["test"]
    logits = classifier.logits([row[data.image_column] for row in test])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(test[data.label_column])).item()
    assert loss == pytest.approx(test_metrics["test_loss"], rel=1e-4, abs=1e-5)
    with (out / "test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == [data.labels[i] for i in test[data.label_column]]
    saved = torch.tensor([[float(row[f"logit_{name}"]) for name in data.labels] for row in rows])
    torch.testing.assert_close(logits, saved, rtol=1e-4, atol=1e-5)
    assert all(Path(row["image"]).is_file() for row in rows)


@pytest.mark.parametrize("method", ["lora", "full", "linear"])
def test_other_methods_train_and_reload(method: str, tiny_vit: Path, image_folder: Path, tmp_path: Path) -> None:
    # ViT at 40 px (its config says 32): the collator passes interpolate_pos_encoding=True.
    argv = tiny_train_args(tiny_vit, image_folder, tmp_path / method, "--method", method, "--image_size", "40")
    argv += ["--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no"]
    result = train(*parse_args(argv))
    out = result.output_dir
    if method == "lora":
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16
        assert set(adapter_config["target_modules"]) in ({"q_proj", "v_proj"}, {"query", "value"})
        assert all("lora_" in k or ".classifier." in k for k in load_file(out / "adapter_model.safetensors"))
    else:
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert "library_name: peft" in (out / "README.md").read_text() if method == "lora" else True
    classifier = load_trained(out)
    assert classifier.preprocessing.image_size == 40 and classifier.forward_kwargs == {
        "interpolate_pos_encoding": True
    }
    image = Image.open(next(image_folder.glob("circle/*.png")))
    (top,) = classifier.predict([image], top_k=2)
    assert len(top) == 2 and {label for label, _ in top} <= {"circle", "square", "stripes"}


def test_linear_probe_trains_only_the_head(tiny_vit: Path) -> None:
    model = build_model(ModelArguments(model_name_or_path=str(tiny_vit), method="linear"), ["a", "b"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_gradient_checkpointing_run(tiny_dinov2: Path, image_folder: Path, tmp_path: Path) -> None:
    argv = tiny_train_args(tiny_dinov2, image_folder, tmp_path / "gc", "--gradient_checkpointing")
    argv += ["--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no"]
    model_args, data_args, training_args = parse_args(argv)
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    result = train(model_args, data_args, training_args)
    assert math.isfinite(result.metrics["test_loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Arguments and recipe defaults


def test_no_arguments_give_the_recipe_defaults() -> None:
    model_args, data_args, training_args = parse_args([])
    assert model_args.model_name_or_path is None and model_args.method == "mona"
    assert data_args.dataset_name is None and data_args.train_dir is None and data_args.image_size == 112
    assert Path(training_args.output_dir) == Path("outputs/mona-dinov2-small-textile")
    assert training_args.learning_rate == DEFAULT_LEARNING_RATES["mona"]
    assert model_args.head_learning_rate == DEFAULT_HEAD_LEARNING_RATE
    assert training_args.max_steps == DEFAULT_MAX_STEPS
    assert training_args.weight_decay == 0.05 and training_args.max_grad_norm == 5.0
    assert _value(training_args.lr_scheduler_type) == "cosine_with_min_lr"
    assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.01}
    assert "adamw" in _value(training_args.optim)
    assert not training_args.remove_unused_columns


def _value(option) -> str:
    return str(getattr(option, "value", option))


def test_flags_override_the_recipe(tmp_path: Path) -> None:
    _, _, args = parse_args(["--num_train_epochs", "2", "--learning_rate", "3e-4", "--lr_scheduler_type", "cosine"])
    assert args.max_steps == -1 and args.num_train_epochs == 2 and args.learning_rate == 3e-4
    assert args.lr_scheduler_kwargs == {}
    model_args, _, args = parse_args(["--method", "full", "--output_dir", str(tmp_path), "--overwrite_output_dir"])
    assert args.learning_rate == DEFAULT_LEARNING_RATES["full"] and args.overwrite_output_dir
    model_args, _, args = parse_args(["--method", "linear", "--learning_rate", "0.02"])
    assert model_args.head_learning_rate == 0.02
    model_args, _, args = parse_args(["--head_learning_rate", "0.01"])
    assert model_args.head_learning_rate == 0.01 and args.learning_rate == DEFAULT_LEARNING_RATES["mona"]
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"method": "lora", "max_steps": 3, "output_dir": str(tmp_path / "x")}))
    model_args, _, args = parse_args([str(config)])
    assert model_args.method == "lora" and args.max_steps == 3
    with pytest.raises(SystemExit):
        parse_args(["--method", "adapterformer"])


def test_weight_decay_spares_norms_biases_scales_and_tokens(tiny_dinov2: Path) -> None:
    model = build_model(ModelArguments(model_name_or_path=str(tiny_dinov2), bottleneck_dim=8), ["a", "b", "c"])
    decayed = set(decay_parameter_names(model))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    mona = {name for name in trainable if ".mona_" in name}
    assert mona and trainable
    for name in mona:
        part = name.split(".default.", 1)[1].split(".")[0]  # ...mona_attn.default.<part>.weight
        expect = part in ("down", "up", "proj") or part.startswith("conv")
        expect = expect and name.endswith("weight")
        assert (name in decayed) == expect, name
    assert not any("scale_norm" in n or "scale_skip" in n or n.endswith("bias") for n in decayed)
    assert {n for n in decayed & trainable if "classifier" in n} == {
        n for n in trainable if "classifier" in n and n.endswith("weight")
    }
    backbone = dict(model.named_parameters())
    for name in ("cls_token", "position_embeddings", "layer_scale1.lambda1", "norm1.weight"):
        assert any(name in n for n in backbone) and not any(name in n for n in decayed), name
    assert decays("x.weight", torch.zeros(2, 2)) and not decays("x.weight", torch.zeros(2))


def test_trainer_builds_the_decay_and_head_groups(tiny_dinov2: Path, tmp_path: Path) -> None:
    model_args, _, args = parse_args(
        ["--model_name_or_path", str(tiny_dinov2), "--output_dir", str(tmp_path), "--eval_strategy", "no"]
    )
    model = build_model(model_args, ["a", "b"])
    trainer = RecipeTrainer(
        model=model, args=args, head_learning_rate=model_args.head_learning_rate, head_names=["classifier"]
    )
    optimizer = trainer.create_optimizer()
    assert "adamw" in type(optimizer).__name__.lower()
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grouped = [
        (group["lr"], group["weight_decay"], {names[id(p)] for p in group["params"]})
        for group in optimizer.param_groups
    ]
    assert set().union(*(params for _, _, params in grouped)) == trainable  # each trainable parameter once
    assert sum(len(params) for _, _, params in grouped) == len(trainable)
    decayed = set(decay_parameter_names(model))
    for lr, weight_decay, params in grouped:
        is_head = {"classifier" in n for n in params}
        assert len(is_head) == 1  # a group holds head parameters only, or none
        assert lr == (DEFAULT_HEAD_LEARNING_RATE if is_head.pop() else DEFAULT_LEARNING_RATES["mona"])
        assert (params <= decayed) if weight_decay == 0.05 else not (params & decayed)
    assert len(grouped) == 4
    assert trainer.lr_scheduler is None  # the scheduler is built on these groups by the Trainer (per-group peaks)


def test_packaged_accuracy_metric_loads_with_evaluate() -> None:
    import evaluate

    metric = evaluate.load(ACCURACY_PATH)
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert load_accuracy().compute(predictions=[1, 1], references=[1, 0], normalize=False) == {"accuracy": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Data: splits, transforms, determinism


def test_split_is_seeded_stratified_and_disjoint(image_folder: Path) -> None:
    args = DataArguments(train_dir=str(image_folder), validation_split_fraction=0.25, test_split_fraction=0.25)
    data, again = prepare_data(args), prepare_data(args)
    paths = {}
    for name in ("train", "validation", "test"):
        split = data.splits[name].cast_column(data.image_column, _undecoded())
        paths[name] = {row[data.image_column]["path"] for row in split}
        assert paths[name] == {
            row[data.image_column]["path"] for row in again.splits[name].cast_column(data.image_column, _undecoded())
        }
        assert sorted(set(data.splits[name][data.label_column])) == [0, 1, 2]  # stratified: every class present
    assert sum(len(p) for p in paths.values()) == 36 and len(set.union(*paths.values())) == 36
    assert data.labels == ["circle", "square", "stripes"] and data.id2label[2] == "stripes"
    limited = prepare_data(DataArguments(train_dir=str(image_folder), max_train_samples=5, max_eval_samples=3))
    assert [len(limited.splits[n]) for n in ("train", "validation", "test")] == [5, 3, 3]


def _undecoded():
    from datasets import Image as ImageFeature

    return ImageFeature(decode=False)


def test_augmentation_depends_only_on_seed_epoch_and_index(image_folder: Path, tiny_dinov2: Path) -> None:
    data = prepare_data(DataArguments(train_dir=str(image_folder)))
    prep = Preprocessing.from_processor(load_image_processor(str(tiny_dinov2)), 32, min_crop_scale=0.2)
    make = lambda seed: TaskDataset(  # noqa: E731
        data.splits["train"], data.image_column, data.label_column, prep, train=True, seed=seed
    )
    a, b = make(0), make(0)
    _ = [b[i] for i in range(5, 0, -1)]  # another access order must not matter
    assert torch.equal(a[3]["pixel_values"], b[3]["pixel_values"])
    assert a[3]["pixel_values"].shape == (3, 32, 32)
    a.set_epoch(1)
    assert not torch.equal(a[3]["pixel_values"], b[3]["pixel_values"])
    assert not torch.equal(make(1)[3]["pixel_values"], b[3]["pixel_values"])
    evaluation = TaskDataset(data.splits["train"], data.image_column, data.label_column, prep)
    assert torch.equal(evaluation[0]["pixel_values"], evaluation[0]["pixel_values"])
    batch = make_collator({"interpolate_pos_encoding": True})([evaluation[0], evaluation[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].dtype == torch.long
    assert batch["interpolate_pos_encoding"] is True


def test_preprocessing_follows_the_image_processor(tiny_dinov2: Path, tiny_vit: Path) -> None:
    cropping = Preprocessing.from_processor(load_image_processor(str(tiny_dinov2)), 112)
    assert cropping.center_crop and (cropping.image_size, cropping.resize_size) == (112, 128)
    assert cropping.mean == (0.485, 0.456, 0.406) and cropping.resample == 3
    saved = Preprocessing.from_processor(load_image_processor(str(tiny_dinov2)))
    assert (saved.image_size, saved.resize_size) == (32, 36)
    direct = Preprocessing.from_processor(load_image_processor(str(tiny_vit)), 48)
    assert not direct.center_crop and direct.mean == (0.5, 0.5, 0.5)
    image = Image.new("RGB", (90, 50), (255, 0, 0))
    assert direct.eval_image(image).size == (48, 48) and cropping.eval_image(image).size == (112, 112)
    pixels = cropping.eval_tensor(image)
    assert pixels[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_forward_kwargs_interpolate_only_when_needed(tiny_vit: Path, tiny_dinov2: Path) -> None:
    vit = build_model(ModelArguments(model_name_or_path=str(tiny_vit), method="linear"), ["a", "b"])
    assert forward_kwargs(vit, 48) == {"interpolate_pos_encoding": True} and forward_kwargs(vit, 32) == {}
    dinov2 = build_model(ModelArguments(model_name_or_path=str(tiny_dinov2), bottleneck_dim=4), ["a", "b"])
    assert forward_kwargs(dinov2, 48) == {}


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and faults


def test_dataset_without_labels_is_refused(tmp_path: Path, tiny_dinov2: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(DataError, match="no label column 'label'.*own sub-folder"):
        prepare_data(DataArguments(train_dir=str(flat)))
    with pytest.raises(DataError, match="no label column 'kind'"):
        prepare_data(DataArguments(train_dir=str(make_image_folder(tmp_path / "ok")), label_column_name="kind"))


def test_single_class_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "one", classes=("only",), per_class=6)
    with pytest.raises(DataError, match="at least two classes.*one class folder: 'only'"):
        prepare_data(DataArguments(train_dir=str(root)))


def test_undecodable_images_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_image_folder(tmp_path / "data", per_class=8)
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = root / "square" / "000.png"
    (root / "square" / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    data = prepare_data(DataArguments(train_dir=str(root)))
    assert "Skipping 2 of 26 train images" in capsys.readouterr().out
    assert data.dropped_images == {"train": 2}
    assert sum(len(data.splits[n]) for n in ("train", "validation", "test")) == 24
    with pytest.raises(DataError, match="2 of 26 train images cannot be decoded.*broken.png"):
        prepare_data(DataArguments(train_dir=str(root), skip_undecodable_images=False))


def test_a_split_with_only_undecodable_images_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "train", per_class=6)
    bad = tmp_path / "validation"
    for name in ("circle", "square", "stripes"):
        (bad / name).mkdir(parents=True)
        (bad / name / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no usable validation image"):
        prepare_data(DataArguments(train_dir=str(root), validation_dir=str(bad)))


def test_models_the_method_cannot_wrap(tmp_path: Path) -> None:
    convnext = make_tiny_checkpoint(tmp_path / "convnext", "convnext")
    with pytest.raises(ModelError, match="--method mona cannot wrap ConvNextForImageClassification"):
        build_model(ModelArguments(model_name_or_path=str(convnext)), ["a", "b"])
    with pytest.raises(ModelError, match="--method lora found no attention query/value"):
        build_model(ModelArguments(model_name_or_path=str(convnext), method="lora"), ["a", "b"])
    bert = make_tiny_checkpoint(tmp_path / "bert", "bert")
    with pytest.raises(ModelError, match=r"\(bert\) cannot be loaded as an image classifier"):
        build_model(ModelArguments(model_name_or_path=str(bert)), ["a", "b"])
    no_processor = make_tiny_checkpoint(tmp_path / "bare", "vit", with_processor=False)
    with pytest.raises(ModelError, match="no usable image processor"):
        load_image_processor(str(no_processor))


def test_apply_method_rejects_unknown_methods(tiny_vit: Path) -> None:
    model = build_model(ModelArguments(model_name_or_path=str(tiny_vit), method="full"), ["a", "b"])
    with pytest.raises(ValueError, match="Unknown method"):
        apply_method(model, "prefix")


def test_output_dir_with_a_model_is_refused(tiny_dinov2: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    argv = tiny_train_args(tiny_dinov2, image_folder, out)
    with pytest.raises(OutputDirError, match="already holds a trained model.*--overwrite_output_dir"):
        train(*parse_args(argv))
    with pytest.raises(OutputDirError, match="not a checkpoint directory"):
        train(*parse_args([*argv, "--resume_from_checkpoint", str(tmp_path / "missing")]))
    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(OutputDirError, match="no checkpoint-"):
        train(*parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    # The CLI says so in one line and exits non-zero, before loading anything.
    result = run_script([str(TRAIN_SCRIPT), *argv])
    assert result.returncode != 0 and "error: The output directory" in result.stderr


def test_overwrite_output_dir_replaces_old_checkpoints(tiny_dinov2: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    argv = tiny_train_args(tiny_dinov2, image_folder, out, "--overwrite_output_dir", "--max_steps", "2")
    train(*parse_args([*argv, "--eval_strategy", "no", "--save_steps", "2"]))
    assert not (out / "checkpoint-99").exists() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "MONA"


def test_drop_path_rate_reaches_the_backbone_or_is_refused(tiny_dinov2: Path, tiny_vit: Path) -> None:
    from mona_peft.training.segmentation import SegmentationModelArguments

    model = build_model(ModelArguments(model_name_or_path=str(tiny_dinov2), drop_path_rate=0.3), ["a", "b"])
    assert model.base_model.model.config.drop_path_rate == 0.3
    rates = [m.drop_prob for m in model.modules() if type(m).__name__.endswith("DropPath")]
    assert rates and all(r == 0.3 for r in rates)
    with pytest.raises(ModelError, match=r"\(vit\) has no stochastic depth"):
        build_model(ModelArguments(model_name_or_path=str(tiny_vit), drop_path_rate=0.3), ["a", "b"])
    with pytest.raises(ValueError, match=r"--drop_path_rate must be in \[0, 1\)"):
        ModelArguments(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="image classification"):
        SegmentationModelArguments(drop_path_rate=0.3)


def test_mona_options_reach_the_adapter_config_and_the_card(tiny_dinov2: Path) -> None:
    from mona_peft.training.card import recipe_hyperparameters

    argv = ["--mona_dropout", "0.0", "--mona_init", "official", "--mona_prefix_tokens", "unchanged"]
    model_args, _, training_args = parse_args([*argv, "--model_name_or_path", str(tiny_dinov2)])
    config = build_model(model_args, ["a", "b"]).peft_config["default"]
    assert (config.dropout, config.init_weights, config.prefix_tokens) == (0.0, "official", "unchanged")
    default = build_model(ModelArguments(model_name_or_path=str(tiny_dinov2)), ["a", "b"]).peft_config["default"]
    assert (default.dropout, default.init_weights, default.prefix_tokens) == (0.1, True, "tokenwise")
    card = recipe_hyperparameters(
        training_args, model_args, 10, head="h", no_decay="n", image_size=32, augmentation="a"
    )
    assert (card["mona_dropout"], card["mona_init"], card["mona_prefix_tokens"]) == (0.0, "official", "unchanged")
    with pytest.raises(ValueError, match=r"--mona_dropout must be a probability in \[0, 1\), got 1.0"):
        ModelArguments(mona_dropout=1.0)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parse_args(["--mona_init", "random"])
