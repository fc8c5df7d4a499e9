"""``MonaModel``: the PEFT tuner that puts Mona into every transformer block of a vision model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, check_target_module_exists
from torch import nn

from .checkpoint import check_checkpoint, read_weights
from .config import MonaConfig
from .families import LAYOUTS, SUPPORTED_BLOCKS, is_patch_grid_conv, layout_for
from .grid import PatchGridTracker
from .heads import task_head_modules
from .layer import MERGE_ERROR, MonaLayer


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, MonaLayer) else module


def default_target_regex(model: nn.Module) -> str:
    """A regex that fully matches the names of every supported block in ``model`` (indices generalised to ``\\d+``).

    Raises a ValueError listing the supported blocks if there is none.
    """
    patterns: list[str] = []
    for name, module in model.named_modules():
        if not name or "base_layer" in name.split(".") or layout_for(_unwrapped(module)) is None:
            continue
        pattern = re.sub(r"(^|\\\.)\d+(?=\\\.|$)", r"\1\\d+", re.escape(name))
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        families = ", ".join(f"{layout.family} ({', '.join(layout.block_classes)})" for layout in LAYOUTS)
        raise ValueError(
            f"Mona found no supported transformer block in {type(model).__name__}. Supported block families: "
            f"{families}. Pass `target_modules` naming such blocks if they sit under an unusual name."
        )
    return patterns[0] if len(patterns) == 1 else "(" + "|".join(patterns) + ")"


class MonaModel(BaseTuner):
    """Creates a Mona model (Yin et al., CVPR 2025) from a Hugging Face vision transformer.

    Use it through PEFT after ``import mona_peft``::

        >>> import mona_peft
        >>> from peft import get_peft_model
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
        ...                                             intermediate_size=128, image_size=32, patch_size=8))
        >>> model = get_peft_model(model, mona_peft.MonaConfig(bottleneck_dim=16))  # Mona + "classifier" trained

    Every targeted block is replaced by a :class:`~mona_peft.layer.MonaLayer` that keeps the block as ``base_layer``.
    Mona cannot be merged into weights; ``unload()`` gives the original model back. With ``modules_to_save=None`` a
    new adapter also trains the model's task head (see :mod:`mona_peft.heads`), e.g. UperNet's ``decode_head`` and
    ``auxiliary_head`` while Mona goes into the Swin backbone only.
    """

    prefix: str = "mona_"
    tuner_layer_cls = MonaLayer
    target_module_mapping: dict[str, Any] = {}

    def _prepare_adapter_config(self, peft_config: MonaConfig, model_config: dict) -> MonaConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_regex(self.model)
        targeted = self._check_targets(peft_config)
        source = peft_config.__dict__.pop("_checkpoint_source", None)
        if source is not None:  # loading a saved adapter: check the weights before the model is changed
            check_checkpoint(self.model, peft_config, targeted, read_weights(source))
        elif peft_config.modules_to_save is None:
            # A new adapter trains the task head by default; the choice is saved in adapter_config.json, so loading
            # reproduces it (a saved adapter is loaded exactly as its config says, even with no head).
            peft_config.modules_to_save = task_head_modules(self.model, targeted) or None
        return peft_config

    def _check_targets(self, peft_config: MonaConfig) -> list[str]:
        """Names of the blocks to adapt; fails before touching the model if a target is not a supported block or
        nothing is targeted."""
        matched = []
        for name, module in self.model.named_modules():
            if not name or any(part.startswith(self.prefix) for part in name.split(".")) or ".base_layer" in name:
                continue
            result = check_target_module_exists(peft_config, name)
            if not result or isinstance(result, _ExcludedModule):
                continue
            block = _unwrapped(module)
            if layout_for(block) is None:
                raise ValueError(
                    f"Mona wraps whole transformer blocks, but target_modules={peft_config.target_modules!r} matches "
                    f"'{name}' ({type(block).__name__}). Target blocks of these classes instead: "
                    f"{', '.join(SUPPORTED_BLOCKS)} (or leave target_modules=None to pick them automatically)."
                )
            matched.append(name)
        if not matched:
            raise ValueError(
                f"Mona's target_modules={peft_config.target_modules!r} (exclude_modules="
                f"{peft_config.exclude_modules!r}) match no module of {type(self.model).__name__}. Leave "
                "target_modules=None to adapt every supported block, or name blocks such as "
                f"{default_target_regex(self.model)!r}."
            )
        return matched

    def _create_and_replace(
        self,
        peft_config: MonaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, MonaLayer):
            target.update_layer(adapter_name, peft_config)
            return
        layout = layout_for(target)
        new_module = MonaLayer(target, adapter_name, peft_config, layout, grid_tracker=self._patch_grid_tracker())
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The adapter is placed on the block's device by MonaLayer itself (a block has no `.weight` to follow).
        setattr(parent, child_name, new_module)

    def _patch_grid_tracker(self) -> PatchGridTracker:
        """The model-wide tracker of ViT-family patch grids, hooked onto every patch-embedding conv once."""
        tracker = self.__dict__.get("_mona_grid_tracker")
        if tracker is None:
            tracker = PatchGridTracker()
            self._mona_grid_tracker = tracker
            self._mona_grid_hooks = [
                module.register_forward_hook(tracker.hook)
                for name, module in self.model.named_modules()
                if is_patch_grid_conv(name, module)
            ]
        return tracker

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # PEFT calls this around every forward; Mona has no per-sample adapter routing, so refuse it loudly rather
        # than silently applying the active adapter to every sample.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Mona does not support mixed-adapter batches (`adapter_names=` in forward). Use "
                "`model.set_adapter(name)` and run one batch per adapter."
            )
        yield

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            raise ValueError(MERGE_ERROR)
        # PEFT's loop restores every tuner layer (via MonaLayer.unload_and_optionally_merge_module) and the
        # modules_to_save wrappers; what is left is the model-wide patch-grid hooks.
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        for handle in self.__dict__.pop("_mona_grid_hooks", []):
            handle.remove()
        self.__dict__.pop("_mona_grid_tracker", None)
        return model
