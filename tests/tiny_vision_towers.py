"""Tiny randomly initialised models of the vision-tower families (DINOv3, CLIP, SigLIP, BEiT, Data2Vec-vision) and
of a dense head on a supported backbone (Depth Anything on DINOv2), built from configs (no downloads).

Every tower is 2 blocks of width 32 with 8x8 patches at a native 32x32 image size. A :class:`Tower` says what a test
needs to know about its model: where its blocks live on each transformers line, the default task head, the text
tower (if any), the prefix tokens, and which image sizes and kwargs it accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

TF5 = int(transformers.__version__.split(".")[0]) >= 5
PATCH = 8
NATIVE = (32, 32)
ODD = (40, 24)  # a 5x3 patch grid: non-square, odd on both sides
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_VISION = dict(**TINY, image_size=32, patch_size=PATCH, projection_dim=16)
CLIP_TEXT = dict(**TINY, vocab_size=99, max_position_embeddings=16, projection_dim=16)
SIGLIP_VISION = dict(**TINY, image_size=32, patch_size=PATCH)
SIGLIP_TEXT = dict(**TINY, vocab_size=99, max_position_embeddings=16)
# layer scale (lambda_1, lambda_2) and relative position bias on, as in the BEiT/Data2Vec checkpoints people tune
BEIT = dict(**TINY, image_size=32, patch_size=PATCH, use_relative_position_bias=True, layer_scale_init_value=0.1)
LLAMA = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAVA_IMAGE_TOKEN = 90


def _dinov3_config(**extra: Any) -> transformers.PretrainedConfig:
    return transformers.DINOv3ViTConfig(
        **TINY, patch_size=PATCH, image_size=32, num_register_tokens=2, layerscale_value=0.5, **extra
    )


def _llava() -> nn.Module:
    config = transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **CLIP_VISION},
        text_config=LLAMA,
        image_token_index=LLAVA_IMAGE_TOKEN,
        image_seq_length=16,
    )
    return transformers.LlavaForConditionalGeneration(config)


def _depth_anything() -> nn.Module:
    backbone = transformers.Dinov2Config(
        **TINY, image_size=32, patch_size=PATCH, out_features=["stage1", "stage2"], reshape_hidden_states=False
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=PATCH,
        reassemble_hidden_size=32,
        reassemble_factors=[2, 1],
        neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16,
        head_hidden_size=16,
    )
    return transformers.DepthAnythingForDepthEstimation(config)


def _text_ids(batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 99, (batch, 7), generator=torch.Generator().manual_seed(1))}


def _llava_ids(batch: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 80, (batch, 24), generator=torch.Generator().manual_seed(1))
    ids[:, 2:18] = LLAVA_IMAGE_TOKEN  # 16 image tokens: the 4x4 grid (LLaVA drops CLIP's CLS)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass(frozen=True)
class Tower:
    name: str
    make: Callable[[], nn.Module]
    # container of the numbered blocks: (transformers 5.x, 4.57); the 4.57 spelling is the Hub's, which saved
    # adapters use on every line
    container: tuple[str, str]
    block_class: str
    head: tuple[str, ...] = ()  # default modules_to_save; () for a bare tower
    text_tower: str | None = None  # the text side (CLIP/SigLIP text tower, LLaVA's language model)
    text_blocks_skipped: int = 0  # blocks of the shared class in the text tower, skipped with a warning
    num_prefix: int = 1  # CLS (+ registers) before the patch tokens
    odd_size: tuple[int, int] | None = ODD  # None: the model accepts its native size only
    interpolate: bool = False  # the model takes `interpolate_pos_encoding`
    extra_inputs: Callable[[int], dict[str, torch.Tensor]] = field(default=lambda batch: {})
    tf5_only: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        """The model in eval mode, with the same weights for the same seed (it stands in for a checkpoint)."""
        torch.manual_seed(seed)
        return self.make().eval()

    @property
    def blocks(self) -> list[str]:
        """Paths of the blocks Mona must adapt, on the running transformers line."""
        return [f"{self.container[0] if TF5 else self.container[1]}.{i}" for i in range(TINY["num_hidden_layers"])]

    @property
    def hub_blocks(self) -> list[str]:
        """The same blocks as saved adapters name them (the Hub spelling)."""
        return [f"{self.container[1]}.{i}" for i in range(TINY["num_hidden_layers"])]

    def sizes(self) -> list[tuple[int, int]]:
        return [NATIVE] if self.odd_size is None else [NATIVE, self.odd_size]

    def inputs(self, size: tuple[int, int] = NATIVE, batch: int = 2, seed: int = 0) -> dict[str, Any]:
        """Forward kwargs for images of ``size`` (with ``interpolate_pos_encoding`` where the model needs it)."""
        generator = torch.Generator().manual_seed(seed)
        kwargs: dict[str, Any] = {"pixel_values": torch.randn(batch, 3, *size, generator=generator)}
        if self.interpolate and size != NATIVE:
            kwargs["interpolate_pos_encoding"] = True
        return {**kwargs, **self.extra_inputs(batch)}


TOWERS: dict[str, Tower] = {
    t.name: t
    for t in (
        Tower(
            "dinov3",
            lambda: transformers.DINOv3ViTModel(_dinov3_config()),
            ("model.layer", "layer"),
            "DINOv3ViTLayer",
            num_prefix=3,  # CLS + 2 registers; RoPE follows the input size (no interpolate_pos_encoding)
        ),
        Tower(
            "dinov3_backbone",
            lambda: transformers.DINOv3ViTBackbone(_dinov3_config(out_features=["stage1", "stage2"])),
            ("model.layer", "layer"),
            "DINOv3ViTLayer",
            num_prefix=3,
            tf5_only=True,
        ),
        Tower(
            "clip_vision",
            lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION)),
            ("encoder.layers", "vision_model.encoder.layers"),
            "CLIPEncoderLayer",
            interpolate=True,
        ),
        Tower(
            "clip_vision_projection",
            lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_VISION)),
            ("vision_model.encoder.layers", "vision_model.encoder.layers"),
            "CLIPEncoderLayer",
            head=("visual_projection",),
            interpolate=True,
        ),
        Tower(
            "clip",
            lambda: transformers.CLIPModel(
                transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16)
            ),
            ("vision_model.encoder.layers", "vision_model.encoder.layers"),
            "CLIPEncoderLayer",
            head=("visual_projection",),
            text_tower="text_model",
            text_blocks_skipped=2,
            interpolate=True,
            extra_inputs=_text_ids,
        ),
        Tower(
            "clip_classifier",
            lambda: transformers.CLIPForImageClassification(
                transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, num_labels=3)
            ),
            ("vision_model.encoder.layers", "vision_model.encoder.layers"),
            "CLIPEncoderLayer",
            head=("classifier",),
            odd_size=None,  # its forward has no interpolate_pos_encoding
        ),
        Tower(
            "llava",
            _llava,
            ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
            "CLIPEncoderLayer",
            head=("model.multi_modal_projector",),
            text_tower="model.language_model",  # Llama blocks: not a supported class, nothing to skip
            odd_size=None,  # the number of image tokens in input_ids is fixed by the native grid
            extra_inputs=_llava_ids,
        ),
        Tower(
            "siglip_vision",
            lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP_VISION)),
            ("encoder.layers", "vision_model.encoder.layers"),
            "SiglipEncoderLayer",
            num_prefix=0,  # no CLS: attention pooling
            interpolate=True,
        ),
        Tower(
            "siglip",
            lambda: transformers.SiglipModel(
                transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION)
            ),
            ("vision_model.encoder.layers", "vision_model.encoder.layers"),
            "SiglipEncoderLayer",
            text_tower="text_model",
            text_blocks_skipped=2,
            num_prefix=0,
            interpolate=True,
            extra_inputs=_text_ids,
        ),
        Tower(
            "siglip_classifier",
            lambda: transformers.SiglipForImageClassification(
                transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION, num_labels=3)
            ),
            ("vision_model.encoder.layers", "vision_model.encoder.layers"),
            "SiglipEncoderLayer",
            head=("classifier",),
            num_prefix=0,
            interpolate=True,
        ),
        Tower(
            "beit",
            lambda: transformers.BeitForImageClassification(transformers.BeitConfig(**BEIT, num_labels=3)),
            ("beit.layers", "beit.encoder.layer"),
            "BeitLayer",
            head=("classifier",),
            interpolate=True,
        ),
        Tower(
            "data2vec_vision",
            lambda: transformers.Data2VecVisionForImageClassification(
                transformers.Data2VecVisionConfig(**BEIT, num_labels=3)
            ),
            ("data2vec_vision.encoder.layer", "data2vec_vision.encoder.layer"),
            "Data2VecVisionLayer",
            head=("classifier",),
            interpolate=True,
        ),
        Tower(
            "depth_anything",
            _depth_anything,
            ("backbone.encoder.layer", "backbone.encoder.layer"),
            "Dinov2Layer",
            head=("neck", "head"),
        ),
    )
}


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (nested ModelOutputs, tuples and lists included), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, transformers.utils.ModelOutput):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every trainable parameter (Mona's and the head's) non-trivial random values."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(noise + (1.0 if "scale_skip" in name else 0.0) if ".mona_" in name else param + noise)
