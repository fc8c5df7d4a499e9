"""Detection models for the recipe: a DETR-family detector on a DINOv2 or Swin backbone checkpoint (its weights
copied into the detector's backbone), or a detector checkpoint; reloading a trained one."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ...heads import share_saved_modules
from ..hub_kernels import hub_kernels_off_by_default
from ..recipe import ModelError, hub_kwargs, lora_target_modules

METADATA_FILE = "detection.json"
FROZEN_FILE = "detector_frozen.safetensors"
"""The detector's frozen parameters outside its backbone and outside ``modules_to_save`` (Deformable DETR's
``level_embed``: a bare parameter of ``model.model``, see :mod:`mona_peft.heads`), randomly initialised when the
detector is new; saved so that a reload rebuilds the trained detector exactly."""
BACKBONE_TYPES = ("dinov2", "swin")
DETECTOR_TYPES = ("deformable_detr", "detr")


def _backbone_class(model_type: str) -> Any:
    import transformers

    return transformers.Dinov2Backbone if model_type == "dinov2" else transformers.SwinBackbone


def detector_config(backbone_config: Any, detector: str, labels: list[str], sizes: dict[str, int]) -> Any:
    """A new ``detector`` config around ``backbone_config``, for ``labels``, with ``sizes`` (d_model, layers,
    queries)."""
    import transformers

    common = dict(
        backbone_config=backbone_config,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        d_model=sizes["d_model"],
        encoder_layers=sizes["encoder_layers"],
        decoder_layers=sizes["decoder_layers"],
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * sizes["d_model"],
        decoder_ffn_dim=2 * sizes["d_model"],
        num_queries=sizes["num_queries"],
    )
    if detector == "detr":
        return transformers.DetrConfig(**common)
    return transformers.DeformableDetrConfig(num_feature_levels=2, **common)


def _backbone_module(model: nn.Module, cls: type) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, cls))


def load_detector(model_args: Any, labels: list[str], model_path: str) -> nn.Module:
    """The detector for ``labels`` (no method applied): a new ``--detector`` whose backbone holds the weights of a
    DINOv2/Swin checkpoint (DINOv2: its last block's features; Swin: its last three stages), or a detector checkpoint
    with its class head resized to ``labels``."""
    import transformers

    hub = hub_kwargs(model_args)
    config = transformers.AutoConfig.from_pretrained(model_path, **hub)
    if config.model_type in DETECTOR_TYPES:
        return transformers.AutoModelForObjectDetection.from_pretrained(
            model_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,
            **hub,
        )
    if config.model_type not in BACKBONE_TYPES:
        raise ModelError(
            f"{model_path} is a {config.model_type} checkpoint; the detection recipe takes a DINOv2 or "
            "Swin checkpoint (which gets a new detector) or a DETR / Deformable DETR checkpoint."
        )
    if config.model_type == "dinov2":
        stages = [f"stage{config.num_hidden_layers}"]
    else:
        stages = [f"stage{i + 1}" for i in range(len(config.depths))][-3:]
    cls = _backbone_class(config.model_type)
    backbone = cls.from_pretrained(model_path, out_features=stages, **hub)
    sizes = {k: getattr(model_args, k) for k in ("d_model", "encoder_layers", "decoder_layers", "num_queries")}
    detector_cls = (
        transformers.DetrForObjectDetection
        if model_args.detector == "detr"
        else transformers.DeformableDetrForObjectDetection
    )
    model = detector_cls(detector_config(backbone.config, model_args.detector, labels, sizes))
    _backbone_module(model, cls).load_state_dict(backbone.state_dict())
    return model


@contextmanager
def no_embedding_question(model: nn.Module) -> Iterator[None]:
    """While LoRA wraps (or reloads onto) a detector: PEFT asks a model that declares tied weights which modules are
    tied to its token embeddings, and DETR-family detectors (which tie their per-level box heads, and have no token
    embeddings) answer with NotImplementedError. ``tie_word_embeddings=False`` makes PEFT skip the question; the
    config is restored after. (Mona's tuner answers the question itself, see ``mona_peft.model``.)"""
    config = model.config
    before = getattr(config, "tie_word_embeddings", None)
    config.tie_word_embeddings = False
    try:
        yield
    finally:
        config.tie_word_embeddings = before


def share_heads(model: nn.Module) -> nn.Module:
    """After LoRA wraps a detector: its per-level class and box heads are one module reached from several paths (or
    tied twins); point every path at the trained ``modules_to_save`` copy, as Mona's tuner does (idempotent)."""
    share_saved_modules(model)
    return model


def detection_lora_targets(model: nn.Module) -> str:
    """LoRA's ``target_modules``: the query/value projections of the backbone only (not the detector's attention)."""
    backbone = next((m for n, m in model.named_modules() if n.split(".")[-1] == "backbone"), model)
    names = "|".join(re.escape(n) for n in lora_target_modules(backbone))  # not the detector's q_proj/v_proj
    return rf".*backbone\..*\.({names})"


def write_metadata(output_dir: str | Path, **values: Any) -> Path:
    path = Path(output_dir) / METADATA_FILE
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def frozen_detector_parameters(model: nn.Module) -> dict[str, Any]:
    """The parameters of :data:`FROZEN_FILE` in ``model`` (a transformers detector, possibly adapted), by name."""
    return {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if not param.requires_grad and ".backbone." not in f".{name}" and "original_module" not in name
    }


@hub_kernels_off_by_default()
def load_trained_detector(directory: str | Path) -> nn.Module:
    """A detector trained by ``scripts/train_detection.py``, ready for inference (eval mode): the saved detector
    config rebuilt around the backbone checkpoint recorded in ``detection.json``, with the adapter (Mona/LoRA) and the
    trained detector parts loaded onto it; a fully fine-tuned model loads directly."""
    import transformers
    from peft import PeftModel

    from ..inference import resolve_base_model

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        return transformers.AutoModelForObjectDetection.from_pretrained(directory).eval()
    meta = json.loads((directory / METADATA_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(directory)
    if meta.get("base_checkpoint"):
        model = transformers.AutoModelForObjectDetection.from_pretrained(meta["base_checkpoint"], config=config)
    else:
        model = transformers.AutoModelForObjectDetection.from_config(config)
        cls = _backbone_class(config.backbone_config.model_type)
        checkpoint = resolve_base_model(meta["backbone_checkpoint"])  # a cache path of the machine that trained it
        backbone = cls.from_pretrained(checkpoint, out_features=config.backbone_config.out_features)
        _backbone_module(model, cls).load_state_dict(backbone.state_dict())
        if (directory / FROZEN_FILE).is_file():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(directory / FROZEN_FILE), strict=False)
    with no_embedding_question(model):
        loaded = PeftModel.from_pretrained(model, directory)
    share_heads(loaded)
    return loaded.eval()
