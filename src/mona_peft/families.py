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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """How to place Mona in one family of transformer blocks."""

    family: str
    block_classes: tuple[str, ...]
    entry_candidates: tuple[str, ...]
    join_candidates: tuple[str, ...]
    # "patch_grid": ViT-like, grid from the patch-embedding conv, prefix tokens possible.
    # "input_dimensions": Swin-like, grid passed to the block as its second argument.
    grid_source: Literal["patch_grid", "input_dimensions"]
    # ``config.model_type`` of the transformers models built from these blocks (ViTModel, SwinBackbone, ...): a
    # sub-model of one of these types is the backbone, everything beside it is task head (see ``heads.py``).
    model_types: tuple[str, ...] = ()

    def resolve(self, block: nn.Module) -> tuple[str, str]:
        """Names of the entry and join sub-modules of ``block`` (raises if this layout does not fit it)."""
        entry = _first_child(block, self.entry_candidates)
        join = _first_child(block, self.join_candidates)
        if entry is None or join is None:
            raise TypeError(
                f"{type(block).__name__} does not have the sub-modules Mona expects for the {self.family} family "
                f"(one of {self.entry_candidates} and one of {self.join_candidates}); this transformers version may "
                "have changed the block. Please report it with your transformers version."
            )
        return entry, join


def _first_child(block: nn.Module, names: Sequence[str]) -> str | None:
    children = dict(block.named_children())
    return next((name for name in names if name in children), None)


LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout(
        family="vit",
        block_classes=("ViTLayer", "DeiTLayer"),
        entry_candidates=("layernorm_after",),
        join_candidates=("output", "dropout"),
        grid_source="patch_grid",
        model_types=("vit", "deit"),
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
)

SUPPORTED_BLOCKS: tuple[str, ...] = tuple(name for layout in LAYOUTS for name in layout.block_classes)
BACKBONE_MODEL_TYPES: frozenset[str] = frozenset(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(block: nn.Module) -> BlockLayout | None:
    """The layout for this block's class, or None if Mona does not support it."""
    name = type(block).__name__
    return next((layout for layout in LAYOUTS if name in layout.block_classes), None)


def is_patch_grid_conv(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is a ViT-family patch-embedding conv, whose output [B, C, h, w] gives the token grid."""
    return isinstance(module, nn.Conv2d) and name.endswith("patch_embeddings.projection")
