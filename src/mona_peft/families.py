"""Where Mona goes inside each supported transformer block, expressed as data.

Transformers writes a block's residual adds inline in ``forward``, so Mona cannot be placed there by wrapping a
sub-module. Instead each layout names two sub-modules of the block:

* ``entry``: the first sub-module that receives the post-attention residual stream ``x1`` (the second norm for
  pre-norm blocks, the MLP input for Swinv2's post-norm block). A pre-hook replaces its input by ``mona_1(x1)``.
* ``join``: the sub-module whose output is added to ``x1`` to close the MLP branch. Its first call after ``entry``
  gets ``mona_1(x1) - x1`` added, so the residual add yields ``mona_1(x1) + mlp(...)``, exactly as if ``x1`` had been
  replaced by ``mona_1(x1)`` in place.

The second Mona is applied to the block's output. Candidates are tried in order because transformers renamed block
internals between 4.x and 5.x (e.g. ViT's ``output`` became ``mlp`` + ``dropout``).

Each layout also says where the block's token grid comes from (``grid_source``, see :class:`BlockLayout`). Adding a
family is one entry in :data:`LAYOUTS` (and, for a new grid source, a token layout in :mod:`mona_peft.tokens`); see
docs/families.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .tokens import PackedImages, PaddedImages, TokenLayout

GridSource = Literal["patch_grid", "input_dimensions", "token_map", "tower"]


@dataclass(frozen=True)
class BlockLayout:
    """How to place Mona in one family of transformer blocks."""

    family: str
    block_classes: tuple[str, ...]
    entry_candidates: tuple[str, ...]
    join_candidates: tuple[str, ...]
    # "patch_grid": ViT-like, grid from the patch-embedding conv, prefix tokens possible.
    # "input_dimensions": Swin-like, grid passed to the block as its second argument.
    # "token_map": the block's input is already [B, H, W, C] (SAM's image encoder).
    # "tower": a pre-hook on a module of ``tower_classes`` builds the call's TokenLayout from its arguments
    # (``tower_layout``): SigLIP2's per-image ``spatial_shapes``, Qwen2-VL's packed ``grid_thw``.
    grid_source: GridSource
    # ``config.model_type`` of the transformers models built from these blocks (ViTModel, SwinBackbone, ...): a
    # sub-model of one of these types is the backbone, everything beside it is task head (see ``heads.py``).
    model_types: tuple[str, ...] = ()
    # Block paths that transformers lines spell differently, as (a line's spelling, the canonical spelling) of the
    # container holding the numbered blocks. Saved adapters use the canonical one, the name in the checkpoints on the
    # Hub: transformers 5.x calls ViT's blocks ``vit.layers.N``, 4.x and Hub checkpoints ``vit.encoder.layer.N``.
    path_spellings: tuple[tuple[str, str], ...] = ()
    # Sub-modules whose output *is* the block's output (the MLP residual add included), tried in order; when one is
    # present the second Mona is applied to its output, else to the block's output. transformers 4.x's ViTOutput adds
    # the residual itself, and 4.x records hidden states from the block's ``forward`` return value, before any hook
    # on the block runs; applying Mona inside ``forward`` keeps ``output_hidden_states`` post-Mona there too.
    output_candidates: tuple[str, ...] = ()
    # The block class is shared with a text tower (CLIP, SigLIP): only blocks of a vision tower are adapted.
    vision_only: bool = False
    tower_classes: tuple[str, ...] = ()
    tower_layout: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], TokenLayout] | None = None
    # False where the blocks' tokens are not grouped per sample of the batch (Qwen2-VL packs every image into one
    # sequence), so a mixed-adapter batch (``adapter_names``) cannot be routed and is refused up front.
    mixed_batches: bool = True

    def resolve(self, block: nn.Module) -> tuple[str, str, str | None]:
        """Names of the entry, join and output sub-modules of ``block`` (output None: the block itself); raises if
        this layout does not fit the block."""
        entry = _first_child(block, self.entry_candidates)
        join = _first_child(block, self.join_candidates)
        if entry is None or join is None:
            raise TypeError(
                f"{type(block).__name__} does not have the sub-modules Mona expects for the {self.family} family "
                f"(one of {self.entry_candidates} and one of {self.join_candidates}); this transformers version may "
                "have changed the block. Please report it with your transformers version."
            )
        return entry, join, _first_child(block, self.output_candidates)


def _first_child(block: nn.Module, names: Sequence[str]) -> str | None:
    children = dict(block.named_children())
    return next((name for name in names if name in children), None)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def _siglip2_layout(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenLayout:
    """Siglip2VisionEmbeddings(pixel_values, spatial_shapes): each image's own patch grid, then padding."""
    shapes = _argument(args, kwargs, "spatial_shapes", 1)
    if shapes is None:
        raise ValueError(
            "SigLIP2's vision embeddings were called without `spatial_shapes`; Mona needs each image's patch grid "
            "(pass what Siglip2ImageProcessor returns: pixel_values, pixel_attention_mask and spatial_shapes)."
        )
    layout = PaddedImages(shapes)
    pixels = _argument(args, kwargs, "pixel_values", 0)
    if isinstance(pixels, torch.Tensor):
        layout.check(pixels, "SigLIP2's vision embeddings")
    return layout


def _qwen2_vl_layout(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenLayout:
    """Qwen2(.5)-VL's vision tower (hidden_states, grid_thw): packed images in spatial-merge (and window) order."""
    grid_thw = _argument(args, kwargs, "grid_thw", 1)
    if grid_thw is None:
        raise ValueError(
            f"{type(module).__name__} was called without `grid_thw`; Mona needs the (t, h, w) patch grid of every "
            "packed image (pass what the Qwen2-VL image processor returns: pixel_values and image_grid_thw)."
        )
    merge = int(module.spatial_merge_size)
    group_order = None
    if getattr(module, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: groups in window order
        group_order = kwargs.get("window_index")
        if group_order is None and hasattr(module, "get_window_index"):  # transformers 4.x
            group_order, _ = module.get_window_index(grid_thw)
        elif group_order is None:  # transformers 5.x
            from transformers.vision_utils import get_vision_window_index

            group_order, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=module.window_size, patch_size=module.patch_size
            )
    layout = PackedImages(grid_thw, merge, group_order)
    patches = _argument(args, kwargs, "hidden_states", 0)
    if isinstance(patches, torch.Tensor) and (patches.dim() != 2 or patches.shape[0] != layout.num_tokens):
        raise ValueError(
            f"{type(module).__name__} got pixel values of shape {tuple(patches.shape)} but `grid_thw` "
            f"{grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw} describes {layout.num_tokens} "
            f"patches: expected [{layout.num_tokens}, channels x temporal_patch_size x patch_size**2]."
        )
    return layout


LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout(
        family="vit",
        block_classes=("ViTLayer", "DeiTLayer"),
        entry_candidates=("layernorm_after",),
        join_candidates=("output", "dropout"),
        grid_source="patch_grid",
        model_types=("vit", "deit"),
        path_spellings=(("layers", "encoder.layer"),),
        output_candidates=("output",),  # 4.x's ViTOutput: mlp + residual (5.x has no `output`: the block's output)
    ),
    BlockLayout(
        family="dinov2",
        block_classes=("Dinov2Layer", "Dinov2WithRegistersLayer"),
        entry_candidates=("norm2",),
        join_candidates=("drop_path",),
        grid_source="patch_grid",
        model_types=("dinov2", "dinov2_with_registers"),
    ),
    BlockLayout(
        family="swin",
        block_classes=("SwinLayer",),
        entry_candidates=("layernorm_after",),
        join_candidates=("output", "dropout"),
        grid_source="input_dimensions",
        model_types=("swin",),
    ),
    BlockLayout(
        family="swinv2",
        block_classes=("Swinv2Layer",),
        entry_candidates=("intermediate",),
        join_candidates=("drop_path",),
        grid_source="input_dimensions",
        model_types=("swinv2",),
    ),
    BlockLayout(
        family="dinov3",
        block_classes=("DINOv3ViTLayer",),
        entry_candidates=("norm2",),
        join_candidates=("drop_path",),
        grid_source="patch_grid",
        model_types=("dinov3_vit",),
        path_spellings=(("model.layer", "layer"),),  # 5.x: DINOv3ViTModel.model.layer.N
    ),
    BlockLayout(
        family="clip",
        block_classes=("CLIPEncoderLayer",),
        entry_candidates=("layer_norm2",),
        join_candidates=("mlp",),
        grid_source="patch_grid",
        model_types=("clip_vision_model",),
        path_spellings=(("encoder.layers", "vision_model.encoder.layers"),),  # 5.x: CLIPVisionModel.encoder...
        vision_only=True,
    ),
    BlockLayout(
        family="siglip",
        block_classes=("SiglipEncoderLayer",),
        entry_candidates=("layer_norm2",),
        join_candidates=("mlp",),
        grid_source="patch_grid",
        model_types=("siglip_vision_model",),
        path_spellings=(("encoder.layers", "vision_model.encoder.layers"),),
        vision_only=True,
    ),
    BlockLayout(
        family="siglip2",
        block_classes=("Siglip2EncoderLayer",),
        entry_candidates=("layer_norm2",),
        join_candidates=("mlp",),
        grid_source="tower",
        model_types=("siglip2_vision_model",),
        path_spellings=(("encoder.layers", "vision_model.encoder.layers"),),
        vision_only=True,
        tower_classes=("Siglip2VisionEmbeddings",),
        tower_layout=_siglip2_layout,
    ),
    BlockLayout(
        family="beit",
        block_classes=("BeitLayer", "Data2VecVisionLayer"),
        entry_candidates=("layernorm_after",),
        join_candidates=("drop_path",),
        grid_source="patch_grid",
        model_types=("beit", "data2vec-vision"),
        path_spellings=(("layers", "encoder.layer"),),
    ),
    BlockLayout(
        family="sam",
        block_classes=("SamVisionLayer",),
        entry_candidates=("layer_norm2",),
        join_candidates=("mlp",),
        grid_source="token_map",
        model_types=("sam_vision_model",),
    ),
    BlockLayout(
        family="qwen2_vl",
        block_classes=("Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock"),
        entry_candidates=("norm2",),
        join_candidates=("mlp",),
        grid_source="tower",
        tower_classes=("Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel"),
        tower_layout=_qwen2_vl_layout,
        mixed_batches=False,
    ),
)

SUPPORTED_BLOCKS: tuple[str, ...] = tuple(name for layout in LAYOUTS for name in layout.block_classes)
BACKBONE_MODEL_TYPES: frozenset[str] = frozenset(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(block: nn.Module) -> BlockLayout | None:
    """The layout for this block's class, or None if Mona does not support it."""
    name = type(block).__name__
    return next((layout for layout in LAYOUTS if name in layout.block_classes), None)


def _respell(path: str, old: str, new: str) -> str | None:
    """``path`` with its trailing ``<old>.<index>`` spelled ``<new>.<index>``, or None if it does not end that way."""
    match = re.search(rf"(^|\.){re.escape(old)}\.(\d+)$", path)
    return None if match is None else f"{path[: match.start()]}{match.group(1)}{new}.{match.group(2)}"


def canonical_block_path(path: str, layout: BlockLayout) -> str:
    """The spelling of a block path that saved adapters use on every transformers line (the Hub checkpoints' names)."""
    for line_spelling, canonical in layout.path_spellings:
        # One spelling may end with the other (CLIP: ``encoder.layers`` / ``vision_model.encoder.layers``): the longer
        # one is tried first, so a path already in its canonical spelling is never respelled again.
        if len(canonical) >= len(line_spelling) and _respell(path, canonical, canonical) is not None:
            return path
        respelled = _respell(path, line_spelling, canonical)
        if respelled is not None:
            return respelled
    return path


def block_path_spellings(path: str, layout: BlockLayout) -> set[str]:
    """Every spelling of a block path that a supported transformers line uses: this line's, the canonical one and the
    others'. Used to match ``target_modules`` and weights written under another line."""
    canonical = canonical_block_path(path, layout)
    spellings = {path, canonical}
    for line_spelling, canonical_spelling in layout.path_spellings:
        other = _respell(canonical, canonical_spelling, line_spelling)
        if other is not None:
            spellings.add(other)
    return spellings


def is_patch_grid_conv(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is a patch-embedding conv of a ViT-like family, whose output [B, C, h, w] gives the grid:
    ``...patch_embeddings.projection`` (ViT, DeiT, DINOv2, BEiT), ``...patch_embeddings`` (DINOv3),
    ``...patch_embedding`` (CLIP, SigLIP), also as a ``modules_to_save`` copy."""
    if not isinstance(module, nn.Conv2d):
        return False
    parts = name.split(".")
    return parts[-1] in ("patch_embeddings", "patch_embedding") or (
        parts[-1] == "projection" and "patch_embeddings" in parts
    )


def tower_layout_for(module: nn.Module) -> BlockLayout | None:
    """The layout whose token grid a pre-hook on ``module`` records (grid source "tower"), if any."""
    name = type(module).__name__
    return next((layout for layout in LAYOUTS if name in layout.tower_classes), None)


def is_text_block(model: nn.Module, path: str) -> bool:
    """Whether the block at ``path`` sits in a text tower: its nearest enclosing module with ``embeddings`` embeds
    text (``CLIPTextEmbeddings``, ``SiglipTextEmbeddings``...) rather than images."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth])) if depth else model
        embeddings = getattr(ancestor, "embeddings", None)
        if isinstance(embeddings, nn.Module):
            name = type(embeddings).__name__
            return "Text" in name and "Vision" not in name
    return False


def block_hidden_width(block: nn.Module) -> int:
    """Width of a block's residual stream: the size of its first LayerNorm (or RMSNorm, as in Qwen2.5-VL)."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
        weight = getattr(module, "weight", None)
        if type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor):
            return int(weight.shape[-1])
    raise TypeError(f"Cannot find the hidden size of {type(block).__name__}: it has no LayerNorm or RMSNorm.")
