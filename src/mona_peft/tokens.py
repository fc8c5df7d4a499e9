"""Where the image tokens are in a block's residual stream: the token layouts Mona's spatial filter runs on.

Mona's depthwise filter needs the 2-D arrangement of the patch tokens; everything else in Mona is token-wise. Most
families keep a batch of same-size images as ``[B, N, C]`` with optional prefix tokens (CLS, registers) first; that
case is a plain ``(height, width)`` grid and is handled inline by :class:`~mona_peft.adapter.MonaAdapter`. The
layouts here cover the others:

* :class:`TokenMap`: tokens already laid out as an image, ``[B, H, W, C]`` (SAM's image encoder).
* :class:`PaddedImages`: ``[B, N, C]`` where each sample is its own ``h_i x w_i`` image followed by padding
  (SigLIP2's NaFlex); each image is filtered on its own grid and padding never reaches a real token.
* :class:`PackedImages`: ``[N, C]`` with the patches of several images (and video frames) packed one after the other
  in spatial-merge order (Qwen2-VL's vision tower, and Qwen2.5-VL's window order on top); each frame is filtered on
  its own grid in its true 2-D layout.

A layout's :meth:`~TokenLayout.filter` takes the bottleneck activations in the stream's shape and a filter
``[b, m, H, W] -> [b, m, H, W]`` and returns the activations with the image tokens filtered, every other token as it
was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Filter = Callable[[torch.Tensor], torch.Tensor]


class TokenLayout:
    """How the tokens of one call are arranged; see the module docstring."""

    num_prefix: int = 0

    def check(self, x: torch.Tensor, where: str) -> None:
        """Raise a ValueError naming the expected shapes if ``x`` does not fit this layout."""

    def filter(self, h: torch.Tensor, spatial: Filter) -> torch.Tensor:
        raise NotImplementedError

    def select(self, index: torch.Tensor, positions: Sequence[int]) -> TokenLayout:
        """The layout of the samples ``positions`` (also given as the tensor ``index``) of a mixed-adapter batch."""
        return self


class TokenMap(TokenLayout):
    """Tokens laid out as an image, ``[B, H, W, C]`` (SAM's image encoder)."""

    def check(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{where} expects tokens laid out as [batch, height, width, channels], got {tuple(x.shape)}."
            )

    def filter(self, h: torch.Tensor, spatial: Filter) -> torch.Tensor:
        return spatial(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PaddedImages(TokenLayout):
    """``[B, N, C]`` where sample ``i`` holds an ``h_i x w_i`` image in row-major order, then padding (SigLIP2 NaFlex).

    Args:
        shapes: ``(h_i, w_i)`` per sample, e.g. SigLIP2's ``spatial_shapes`` [B, 2].
    """

    def __init__(self, shapes: torch.Tensor | Sequence[Sequence[int]]) -> None:
        rows = shapes.tolist() if isinstance(shapes, torch.Tensor) else [list(s) for s in shapes]
        self.shapes: tuple[tuple[int, int], ...] = tuple((int(h), int(w)) for h, w in rows)

    def check(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 3 or x.shape[0] != len(self.shapes):
            raise ValueError(
                f"{where} got tokens of shape {tuple(x.shape)} but spatial shapes for {len(self.shapes)} image(s): "
                "expected [batch, tokens, channels] with one (height, width) per image."
            )
        too_big = [(i, s) for i, s in enumerate(self.shapes) if s[0] * s[1] > x.shape[1]]
        if too_big:
            i, (h, w) = too_big[0]
            raise ValueError(
                f"{where}: image {i} has a {h}x{w} patch grid ({h * w} tokens) but the sequence holds only "
                f"{x.shape[1]} tokens; `spatial_shapes` does not belong to these pixel values."
            )

    def filter(self, h: torch.Tensor, spatial: Filter) -> torch.Tensor:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(self.shapes):
            groups.setdefault(shape, []).append(i)
        out = h
        for (height, width), samples in groups.items():
            index = torch.tensor(samples, device=h.device)
            rows = h.index_select(0, index)
            image, padding = rows.split([height * width, rows.shape[1] - height * width], dim=1)
            image = image.transpose(1, 2).reshape(len(samples), -1, height, width)
            image = spatial(image).flatten(2).transpose(1, 2)
            out = out.index_copy(0, index, torch.cat([image, padding], dim=1))
        return out

    def select(self, index: torch.Tensor, positions: Sequence[int]) -> PaddedImages:
        return PaddedImages([self.shapes[i] for i in positions])


class PackedImages(TokenLayout):
    """``[N, C]``: the patches of several images or video frames packed one after the other (Qwen2-VL).

    Within an image of ``t x H x W`` patches, tokens come in spatial-merge order: frame by frame, each ``merge x
    merge`` group of neighbouring patches together, groups in row-major order, i.e. ``(t, H/merge, W/merge, merge,
    merge)``. Qwen2.5-VL further permutes the groups into attention windows (``group_order``: the window-ordered
    stream's group ``k`` is the merge-ordered stream's group ``group_order[k]``).

    Args:
        grid_thw: ``(t, H, W)`` per image, in patches (Qwen2-VL's ``grid_thw``).
        merge: the spatial merge size.
        group_order: Qwen2.5-VL's window index, or None.
    """

    def __init__(
        self,
        grid_thw: torch.Tensor | Sequence[Sequence[int]],
        merge: int,
        group_order: torch.Tensor | None = None,
    ) -> None:
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else [list(g) for g in grid_thw]
        self.grid_thw: tuple[tuple[int, int, int], ...] = tuple((int(t), int(h), int(w)) for t, h, w in rows)
        self.merge = int(merge)
        self.group_order = group_order
        for _, height, width in self.grid_thw:
            if height % self.merge or width % self.merge:
                raise ValueError(
                    f"A packed image of {height}x{width} patches is not divisible into {self.merge}x{self.merge} "
                    "merge groups; `grid_thw` does not fit the vision tower's spatial_merge_size."
                )

    @property
    def num_tokens(self) -> int:
        return sum(t * h * w for t, h, w in self.grid_thw)

    def check(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 2 or x.shape[0] != self.num_tokens:
            raise ValueError(
                f"{where} got packed tokens of shape {tuple(x.shape)} but `grid_thw` {list(self.grid_thw)} describes "
                f"{self.num_tokens} patches: expected [{self.num_tokens}, channels]."
            )

    def filter(self, h: torch.Tensor, spatial: Filter) -> torch.Tensor:
        unit = self.merge * self.merge
        if self.group_order is not None:  # window order -> merge order
            order = self.group_order.to(h.device)
            h = h.reshape(-1, unit, h.shape[-1]).index_select(0, torch.argsort(order)).reshape(h.shape)
        pieces = []
        m = self.merge
        sizes = [t * hh * ww for t, hh, ww in self.grid_thw]
        for piece, (t, height, width) in zip(h.split(sizes), self.grid_thw, strict=True):
            # (t, H/m, W/m, m, m, C) -> (t, H/m, m, W/m, m, C) = (t, H, W, C): the true layout of each frame
            frames = piece.reshape(t, height // m, width // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)
            frames = frames.reshape(t, height, width, -1).permute(0, 3, 1, 2)
            frames = spatial(frames).permute(0, 2, 3, 1).reshape(t, height // m, m, width // m, m, -1)
            pieces.append(frames.permute(0, 1, 3, 2, 4, 5).reshape(t * height * width, -1))
        out = torch.cat(pieces)
        if self.group_order is not None:  # merge order -> window order
            out = out.reshape(-1, unit, out.shape[-1]).index_select(0, order).reshape(out.shape)
        return out

    def select(self, index: torch.Tensor, positions: Sequence[int]) -> TokenLayout:
        raise ValueError(
            "Mixed-adapter batches (`adapter_names`) are not supported on packed vision towers (Qwen2-VL): the "
            "tower's images are not the samples of the batch. Run one adapter per batch."
        )
