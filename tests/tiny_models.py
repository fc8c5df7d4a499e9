"""Tiny randomly initialised models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    build: Any  # () -> nn.Module, in eval mode
    image_size: tuple[int, int]  # the config's native size
    odd_size: tuple[int, int]  # a non-square, awkward size the model accepts
    forward_kwargs: dict  # extra kwargs needed for odd sizes
    num_prefix: int  # prefix tokens (CLS, distillation, registers)


def _vit_kwargs(**extra: Any) -> dict:
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_labels=3,
        **extra,
    )


def _swin_kwargs(**extra: Any) -> dict:
    return dict(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=3,
        **extra,
    )


def vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(**_vit_kwargs())).eval()


def deit() -> nn.Module:
    return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**_vit_kwargs())).eval()


def dinov2() -> nn.Module:
    return transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**_vit_kwargs(layerscale_value=0.5, mlp_ratio=2))
    ).eval()


def dinov2_registers() -> nn.Module:
    return transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(**_vit_kwargs(layerscale_value=0.5, mlp_ratio=2, num_register_tokens=3))
    ).eval()


def swin() -> nn.Module:
    return transformers.SwinForImageClassification(transformers.SwinConfig(**_swin_kwargs())).eval()


def swinv2() -> nn.Module:
    return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**_swin_kwargs())).eval()


FAMILIES = {
    "vit": Family("vit", vit, (32, 32), (40, 24), {"interpolate_pos_encoding": True}, 1),
    "deit": Family("deit", deit, (32, 32), (40, 24), {"interpolate_pos_encoding": True}, 2),
    "dinov2": Family("dinov2", dinov2, (32, 32), (40, 24), {}, 1),
    "dinov2_registers": Family("dinov2_registers", dinov2_registers, (32, 32), (40, 24), {}, 4),
    "swin": Family("swin", swin, (32, 32), (36, 52), {}, 0),
    "swinv2": Family("swinv2", swinv2, (32, 32), (36, 52), {}, 0),
}


def pixels(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator)


def logits(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model(pixel_values=x, **kwargs).logits


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every Mona parameter non-trivial random values (s1, LN affine and biases included)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".mona_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * scale + (1.0 if "scale_skip" in name else 0.0))


def upernet_swin(num_labels: int = 3, auxiliary_head: bool = True, seed: int = 0) -> nn.Module:
    """UperNet on a three-stage Swin backbone (widths 16/32/64), random init, in eval mode."""
    torch.manual_seed(seed)
    backbone = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 2, 1],
        num_heads=[1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3"],
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone,
        hidden_size=16,
        auxiliary_channels=8,
        use_auxiliary_head=auxiliary_head,
        num_labels=num_labels,
        pool_scales=[1, 2],
    )
    return transformers.UperNetForSemanticSegmentation(config).eval()


def mask2former_swin(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """Mask2Former on a four-stage Swin backbone, random init, in eval mode (its loss needs scipy)."""
    torch.manual_seed(seed)
    backbone = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_queries=5,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_labels=num_labels,
        train_num_points=16,
    )
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()
