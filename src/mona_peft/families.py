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

import re
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
    # Block paths that transformers lines spell differently, as (a line's spelling, the canonical spelling) of the
    # container holding the numbered blocks. Saved adapters use the canonical one, the name in the checkpoints on the
    # Hub: transformers 5.x calls ViT's blocks ``vit.layers.N``, 4.x and Hub checkpoints ``vit.encoder.layer.N``.
    path_spellings: tuple[tuple[str, str], ...] = ()
    # Sub-modules whose output *is* the block's output (the MLP residual add included), tried in order; when one is
    # present the second Mona is applied to its output, else to the block's output. transformers 4.x's ViTOutput adds
    # the residual itself, and 4.x records hidden states from the block's ``forward`` return value, before any hook
    # on the block runs; applying Mona inside ``forward`` keeps ``output_hidden_states`` post-Mona there too.
    output_candidates: tuple[str, ...] = ()

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
    """Whether ``module`` is a ViT-family patch-embedding conv, whose output [B, C, h, w] gives the token grid."""
    return isinstance(module, nn.Conv2d) and name.endswith("patch_embeddings.projection")
