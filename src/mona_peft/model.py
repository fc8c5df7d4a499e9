"""``MonaModel``: the PEFT tuner that puts Mona into every transformer block of a vision model."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .checkpoint import MonaCheckpointError, to_checkpoint_keys, to_model_keys
from .config import MonaConfig
from .dispatch import check_placement, keep_offloaded_heads
from .families import (
    LAYOUTS,
    SUPPORTED_BLOCKS,
    block_path_spellings,
    canonical_block_path,
    is_patch_grid_conv,
    is_text_block,
    layout_for,
    tower_layout_for,
)
from .grid import GridTracker
from .heads import share_saved_modules, task_head_modules
from .layer import MERGE_ERROR, POSITION_CONTAINERS, MonaLayer


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, MonaLayer) else module


def skipped_text_blocks(model: nn.Module) -> list[str]:
    """Blocks of a supported class that sit in a text tower (CLIP's, SigLIP's): Mona leaves them alone."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and "base_layer" not in name.split(".")
        and (layout := layout_for(_unwrapped(module))) is not None
        and layout.vision_only
        and is_text_block(model, name)
    ]


def default_target_regex(model: nn.Module) -> str:
    """A regex that fully matches every supported block of ``model`` (indices generalised to ``\\d+``), written with
    the canonical block paths so that it means the same blocks on every transformers line.

    Raises a ValueError listing the supported blocks if there is none.
    """
    patterns: list[str] = []
    for name, module in model.named_modules():
        layout = None if not name or "base_layer" in name.split(".") else layout_for(_unwrapped(module))
        if layout is None or (layout.vision_only and is_text_block(model, name)):
            continue
        name = canonical_block_path(name, layout)
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
            skipped = skipped_text_blocks(self.model)
            if skipped:
                warnings.warn(
                    f"Mona adapts image tokens only: it skipped {len(skipped)} block(s) of a text tower "
                    f"({skipped[0]}, ...), which stay exactly as they are.",
                    stacklevel=2,
                )
        targeted = self._check_targets(peft_config)
        families = "+".join(sorted({layout_for(_unwrapped(self.model.get_submodule(n))).family for n in targeted}))
        if peft_config.block_family is not None and peft_config.block_family != families:
            # Same widths and block paths do not make the same model: CLIP's and SigLIP's vision towers look alike.
            raise MonaCheckpointError(
                f"This Mona adapter was made for {peft_config.block_family} blocks, but its targets in "
                f"{type(self.model).__name__} are {families} blocks: it belongs to another architecture. Load it "
                "onto the model it was trained on; to start a new adapter with these settings, pass the config "
                "with block_family=None."
            )
        peft_config.block_family = families
        if peft_config.modules_to_save is None:
            # A new adapter trains the task head by default; the choice is saved in adapter_config.json, so loading
            # reproduces it (a saved adapter is loaded exactly as its config says, even with no head).
            peft_config.modules_to_save = task_head_modules(self.model, targeted) or None
        return peft_config

    def _prepare_model(self, peft_config: MonaConfig, model: nn.Module) -> None:
        # Runs before any module is replaced: an adapter that cannot be placed (see dispatch.py) fails here.
        check_placement(model, self._check_targets(peft_config), peft_config.modules_to_save)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Copies of accelerate-offloaded heads (modules_to_save) become resident, trainable modules (see dispatch.py).
        if "_mona_requires_grad" not in self.__dict__:  # the base as it was, for a refused first load (_take_out)
            self._mona_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        # PEFT asks about every module of the model in turn: the block spellings are worked out once for all of them
        # (wrapping a block keeps its entry, so the map holds for the whole injection), not once per module.
        self.__dict__["_mona_spellings"] = self._block_spellings()
        try:
            with keep_offloaded_heads(model):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self.__dict__["_mona_spellings"]
        # A head reached from several paths (detectors' per-level heads, see heads.py): all of them use the copy.
        self.__dict__.setdefault("_mona_shared_heads", []).extend(share_saved_modules(model))
        self._hook_grid_sources()

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        # PEFT asks which modules are tied to the token embeddings whenever a model declares tied weights. Detectors
        # (Deformable DETR, Grounding DINO) tie their per-level box heads among themselves and have no
        # `get_input_embeddings`, which makes PEFT's question raise NotImplementedError: nothing can be tied to token
        # embeddings that do not exist.
        try:
            self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return []
        return super()._get_module_names_tied_with_embedding()

    def _check_targets(self, peft_config: MonaConfig) -> list[str]:
        """Names of the blocks to adapt; fails before touching the model if a target is not a supported block or
        nothing is targeted."""
        matched = []
        for name, module in self.model.named_modules():
            if not name or any(part.startswith(self.prefix) for part in name.split(".")) or ".base_layer" in name:
                continue
            if not self._check_target_module_exists(peft_config, name):
                continue
            block = _unwrapped(module)
            layout = layout_for(block)
            if layout is not None and layout.vision_only and is_text_block(self.model, name):
                raise ValueError(
                    f"target_modules={peft_config.target_modules!r} matches '{name}', a block of a text tower: Mona "
                    "filters image tokens on their patch grid and has nothing to do on text. Target the vision "
                    "tower's blocks only (or leave target_modules=None)."
                )
            if layout is None:
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

    def _check_target_module_exists(self, peft_config: MonaConfig, key: str) -> bool:
        """Whether ``target_modules`` / ``exclude_modules`` select the module ``key``, under any spelling of its path
        (this transformers line's, the canonical one, or another line's), so that a config saved under one line
        selects the same blocks under another."""
        spellings = self.__dict__.get("_mona_spellings")
        if spellings is None:  # asked outside inject_adapter (e.g. by PEFT's inspect_matched_modules)
            spellings = self._block_spellings()
        names = spellings.get(key, {key})
        results = [check_target_module_exists(peft_config, name) for name in sorted(names)]
        if any(isinstance(result, _ExcludedModule) for result in results):
            return False
        return any(bool(result) for result in results)

    def _block_spellings(self) -> dict[str, set[str]]:
        """Every spelling of the path of each supported block of the model, by its name in the running model."""
        return {
            name: block_path_spellings(name, layout)
            for name, module in self.model.named_modules()
            if name and "base_layer" not in name.split(".") and (layout := layout_for(_unwrapped(module))) is not None
        }

    # Saving and loading (PEFT's per-method hooks): block paths are saved in their canonical spelling, and loading
    # maps either checkpoint format, saved under any supported transformers line, to the running model.
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: MonaConfig,
        adapter_name: str,
        state_dict: dict,
        unwanted_adapter_names: list[str],
    ) -> dict:
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return to_checkpoint_keys(model, selected)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # ``...mona_attn.<adapter>.down.weight`` -> ``...mona_attn.down.weight`` (PEFT's default only knows adapter
        # names in the last or second-to-last place)
        for container in POSITION_CONTAINERS.values():
            key = key.replace(f".{container}.{adapter_name}.", f".{container}.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MonaConfig, adapter_name: str, state_dict: dict
    ) -> dict:
        try:
            state_dict = to_model_keys(model, config, adapter_name, state_dict)
        except MonaCheckpointError:
            _take_out(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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

    def _patch_grid_tracker(self) -> GridTracker:
        """The model-wide tracker of token grids (see :class:`~mona_peft.grid.GridTracker`); its hooks are added by
        :meth:`_hook_grid_sources` once the adapter is injected."""
        tracker = self.__dict__.get("_mona_grid_tracker")
        if tracker is None:
            tracker = GridTracker()
            self._mona_grid_tracker = tracker
            self._mona_grid_hooks = []
        return tracker

    def _hook_grid_sources(self) -> None:
        """Hook the tracker onto every patch-embedding conv and vision tower that records a grid, including copies
        made by ``modules_to_save`` (PEFT makes them after the blocks are replaced); each module once."""
        tracker = self.__dict__.get("_mona_grid_tracker")
        if tracker is None:
            return
        hooked = self.__dict__.setdefault("_mona_grid_hooked", set())
        for name, module in self.model.named_modules():
            if id(module) in hooked:
                continue
            if is_patch_grid_conv(name, module):
                self._mona_grid_hooks.append(module.register_forward_hook(tracker.patch_hook))
            elif (layout := tower_layout_for(module)) is not None:
                hook = tracker.tower_hook(layout.tower_layout)
                self._mona_grid_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                continue
            hooked.add(id(module))

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT calls this around every forward. With ``adapter_names=[...]`` (one name per sample, ``"__base__"`` for
        none), each Mona layer and each ``modules_to_save`` head gets the names for this call only, through a
        temporary pre-hook, as PEFT does for LoRA."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        self._check_adapter_names(adapter_names, _batch_size(args, kwargs))
        handles = []
        for module in self.model.modules():
            if isinstance(module, (MonaLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names: Any, batch_size: int | None) -> None:
        if self.training:
            raise ValueError(
                "`adapter_names` (a mixed-adapter batch) is for inference: call `model.eval()` first, and train one "
                "adapter per batch."
            )
        packed = next(
            (m for m in self.model.modules() if isinstance(m, MonaLayer) and not m.layout.mixed_batches), None
        )
        if packed is not None:
            # checked before the batch size: a packed tower's first dimension counts patches, not samples
            raise ValueError(
                "Mixed-adapter batches (`adapter_names`) are not supported on packed vision towers "
                f"({type(packed.base_layer).__name__}, Qwen2-VL): the tower's images are not the samples of the "
                "batch. Run one adapter per batch."
            )
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(
                f"`adapter_names` must be a list with one adapter name (or '__base__') per sample, got "
                f"{adapter_names!r}."
            )
        unknown = sorted({name for name in adapter_names if name != "__base__"} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"`adapter_names` names adapter(s) this model does not have: {', '.join(unknown)}. Its adapters are "
                f"{', '.join(sorted(self.peft_config))}; use '__base__' for samples that should get no adapter."
            )
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(
                f"`adapter_names` has {len(adapter_names)} name(s) but the batch has {batch_size} sample(s): give "
                "exactly one adapter name (or '__base__') per sample."
            )

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
        # modules_to_save wrappers, each at one path; the other paths of shared heads and the model-wide patch-grid
        # hooks are restored here.
        for parent, name, _ in self.__dict__.pop("_mona_shared_heads", []):
            wrapper = getattr(parent, name)
            if isinstance(wrapper, AuxiliaryTrainingWrapper):  # the module PEFT puts at the wrapper's own path
                setattr(parent, name, wrapper.unload_and_optionally_merge_module(False, False, None))
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        for handle in self.__dict__.pop("_mona_grid_hooks", []):
            handle.remove()
        self.__dict__.pop("_mona_grid_tracker", None)
        self.__dict__.pop("_mona_grid_hooked", None)
        return model


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward call: the first dimension of ``pixel_values`` (or of the first tensor argument)."""
    candidates = [kwargs.get("pixel_values"), *args, *kwargs.values()]
    tensor = next((t for t in candidates if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if tensor is None else int(tensor.shape[0])


def _inject_adapter_names(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, {**kwargs, "adapter_names": adapter_names}


def set_compute(model: nn.Module, *, fused: bool | None = None, merge_filters: bool | None = None) -> int:
    """Choose how every Mona adapter in ``model`` computes; returns how many adapters were set.

    Args:
        fused: ``True`` (default of new adapters): the scaled norm and the down projection run as one autograd
            function that keeps only its input for backward; ``False``: plain ops, the reference.
        merge_filters: ``True`` (default): the averaged depthwise convs run as one merged conv; ``False``: the
            separate convs, the reference.

    Both forms are exact up to float rounding; this is a runtime choice and is not saved with the adapter.
    """
    from .adapter import MonaAdapter

    adapters = [module for module in model.modules() if isinstance(module, MonaAdapter)]
    for adapter in adapters:
        if fused is not None:
            adapter.fused = fused
        if merge_filters is not None:
            adapter.merge_filters = merge_filters
    return len(adapters)


def _take_out(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter whose weights failed to load, leaving the model as it was before: the whole PEFT wrapping
    when it was the only adapter (the blocks and heads go back in place), else just that adapter."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, MonaModel):
        return
    if list(tuner.peft_config) == [adapter_name]:
        base = tuner._unload_and_optionally_merge(merge=False)
        # PEFT froze the base when it injected the adapter: give the parameters their requires_grad back.
        before = tuner.__dict__.get("_mona_requires_grad", {})
        for name, param in base.named_parameters():
            param.requires_grad_(before.get(name, param.requires_grad))
    else:
        model.delete_adapter(adapter_name)
