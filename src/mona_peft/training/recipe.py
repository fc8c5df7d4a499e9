"""The fine-tuning recipe: the model per method, weight-decay groups, the Trainer and its callbacks.

The official Mona recipe (see ``docs/training.md``) is AdamW with weight decay 0.05 except on norms and biases,
warm-up then cosine decay and gradient clipping at 5; ``arguments.py`` sets those ``TrainingArguments`` defaults, and
:class:`RecipeTrainer` decides which parameters are decayed (:func:`decays`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainerCallback,
)

from .arguments import METHODS, ModelArguments
from .data import IMAGENET_MEAN, IMAGENET_STD
from .distributed import (
    enable_cpu_fsdp,
    fsdp_ram_efficient_loading,
    gather_adapter_state_dict,
    materialize_meta_parameters,
    set_default_wrap_classes,
)

NO_DECAY_NAME_PARTS = (
    "cls_token",
    "mask_token",
    "register_tokens",
    "distillation_token",
    "position_embedding",
    "position_embeddings",
    "absolute_pos_embed",
    "relative_position_bias_table",
)
"""Parameters kept out of weight decay by name, besides every parameter with fewer than two dimensions."""

LORA_TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"))
"""Query/value projection names: transformers >= 5.9 (``q_proj``/``v_proj``) and 4.x (``query``/``value``)."""


class ModelError(ValueError):
    """The model cannot be loaded as an image classifier, or the chosen method cannot be applied to it."""


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether the recipe applies weight decay to a parameter.

    Not decayed: every parameter with fewer than two dimensions (biases, LayerNorm affines, Mona's per-channel scale
    vectors ``s1``/``s2``, DINOv2's layer scale) and the position/class/mask/register tokens and relative-position
    tables (as in the official Swin recipe). Decayed: weight matrices and conv kernels, Mona's included.
    """
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that get weight decay (see :func:`decays`)."""
    return [name for name, param in model.named_parameters() if decays(name, param)]


class RecipeTrainer(Trainer):
    """``transformers.Trainer`` with the recipe's optimizer groups and this project's model card.

    The Trainer builds the optimizer as usual (``--optim`` and its kwargs, FSDP, DeepSpeed keep working); the recipe
    decides which parameters are decayed (:func:`decays`) and gives the new classification head its own peak learning
    rate.

    Args:
        head_learning_rate: peak learning rate of the parameters under ``head_names`` (``None``: the same as
            everything else, ``args.learning_rate``).
        head_names: top-level module names of the classification head (see :func:`head_module_names`).
        model_card_writer: called with the output directory and the number of optimizer steps taken to write
            ``README.md``; used by ``create_model_card``, hence also by ``push_to_hub``.
    """

    def __init__(
        self,
        *args: Any,
        head_learning_rate: float | None = None,
        head_names: Sequence[str] = (),
        model_card_writer: Callable[[str, int], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate
        self.head_names = tuple(head_names)
        self.model_card_writer = model_card_writer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_cpu_fsdp(self)  # FSDP asked for by the launcher, on a machine without an accelerator
        set_default_wrap_classes(self)  # TRANSFORMER_BASED_WRAP without class names: MonaLayer / the blocks

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2, save the full model from the main process whatever ``fsdp_state_dict_type`` says (the Trainer
        saves nothing with ``SHARDED_STATE_DICT``): for a PEFT model only the adapter's tensors are gathered."""
        if not getattr(self.accelerator, "is_fsdp2", False):
            super().save_model(output_dir, _internal_call)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if is_peft_model(self.model):
            state_dict = gather_adapter_state_dict(self.model)  # on every process: it is a collective
        else:
            state_dict = self.accelerator.get_state_dict(self.model)
        if self.args.should_save:  # transformers 4.x's _save writes from whichever process calls it
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if fresh and self.head_learning_rate is not None and self.head_names:
            model = args[0] if args else kwargs.get("model") or self.model
            split_head_groups(optimizer, model, self.head_names, self.head_learning_rate)
        return optimizer

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.model_card_writer is None:
            super().create_model_card(*args, **kwargs)
        elif self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir, self.state.global_step)


def split_head_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, head_names: Sequence[str], head_learning_rate: float
) -> None:
    """Move the head's parameters of every param group of a fresh ``optimizer`` into a group of their own with
    ``head_learning_rate`` (other settings, e.g. weight decay, are kept). ``head_names`` are module names or dotted
    paths (e.g. ``decode_head``, ``model.transformer_module``), matched as whole name parts anywhere in a parameter's
    name, so they also find PEFT's ``modules_to_save`` copies."""
    parts = [f".{head}." for head in head_names]
    head_ids = {id(p) for name, p in model.named_parameters() if any(part in f".{name}." for part in parts)}
    groups = []
    for group in optimizer.param_groups:
        rest = [p for p in group["params"] if id(p) not in head_ids]
        head = [p for p in group["params"] if id(p) in head_ids]
        groups += [{**group, "params": rest}] if rest else []
        groups += [{**group, "params": head, "lr": head_learning_rate}] if head else []
    optimizer.param_groups = groups


class EpochCallback(TrainerCallback):
    """Tell the training dataset which epoch starts, so that its augmentation depends on (seed, epoch, index)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.epoch is fractional when resuming mid-epoch; its integer part is the epoch being run.
        self.dataset.set_epoch(math.floor((state.epoch or 0) + 1e-6))


def resolve_model_path(model_name_or_path: str | None) -> str:
    """The checkpoint to load: the argument, or the offline DINOv2-small (converted once into the cache)."""
    if model_name_or_path is not None:
        return model_name_or_path
    from ..offline import ensure_dinov2_small

    return str(ensure_dinov2_small())


def hub_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """The Hub keyword arguments of ``from_pretrained`` (cache directory, revision, token) from ``model_args``."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def load_image_processor(model_name_or_path: str, **hub: Any) -> Any:
    """The checkpoint's image processor (PIL backend); raises :class:`ModelError` if it has none."""
    import transformers

    kwargs = {k: v for k, v in hub.items() if v is not None}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["backend"] = "pil"  # torchvision is not a dependency; say so instead of warning about it
    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{model_name_or_path} has no usable image processor (preprocessor_config.json): {exc}. The recipe "
            "normalises images with the model's own processor; save it next to the checkpoint, e.g. "
            "AutoImageProcessor.from_pretrained(<the model it came from>).save_pretrained(<checkpoint dir>)."
        ) from exc


def image_normalisation(model_path: str, model_args: ModelArguments) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` to normalise images with: those of ``model_path``'s image processor (loaded
    with ``model_args``' cache directory, revision and token), or ImageNet's (said on stdout) when the checkpoint has
    none. The segmentation and detection tasks normalise with it; classification requires the processor instead
    (:meth:`~mona_peft.training.data.Preprocessing.from_processor`)."""
    try:
        processor = load_image_processor(model_path, **hub_kwargs(model_args))
    except ModelError:
        print(f"{model_path} has no image processor: normalising with the ImageNet mean and std.", flush=True)
        return IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
    return mean, std


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the task head(s): the top-level modules with parameters outside the backbone (``classifier``,
    or DeiT's ``cls_classifier`` and ``distillation_classifier``)."""
    backbone = getattr(model, "base_model_prefix", None)
    heads = [
        name for name, child in model.named_children() if name != backbone and any(True for _ in child.parameters())
    ]
    if not heads:
        raise ModelError(
            f"Cannot find the classification head of {type(model).__name__} (children: "
            f"{[name for name, _ in model.named_children()]})."
        )
    return heads


def lora_target_modules(model: nn.Module) -> list[str]:
    """The query/value projection names of this transformers version's attention (LoRA's targets in PEFT's ViT
    example)."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for candidates in LORA_TARGET_CANDIDATES:
        if set(candidates) <= leaves:
            return list(candidates)
    raise ModelError(
        f"--method lora found no attention query/value projections in {type(model).__name__} (looked for "
        f"{LORA_TARGET_CANDIDATES}); use a ViT/DeiT/DINOv2/Swin checkpoint or another --method."
    )


def load_classifier(model_args: ModelArguments, labels: list[str], model_path: str | None = None) -> nn.Module:
    """The pretrained backbone with a fresh classification head for ``labels`` (no method applied yet)."""
    path = model_path or resolve_model_path(model_args.model_name_or_path)
    hub = hub_kwargs(model_args)
    config = AutoConfig.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **hub,
    )
    if model_args.drop_path_rate is not None:
        if not hasattr(config, "drop_path_rate"):
            raise ModelError(
                f"--drop_path_rate: {path} ({config.model_type}) has no stochastic depth to set; leave the option out."
            )
        config.drop_path_rate = model_args.drop_path_rate
    try:
        return AutoModelForImageClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
        )
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ModelError(
            f"{path} ({config.model_type}) cannot be loaded as an image classifier: {str(exc).splitlines()[0]} "
            "Use a ViT, DeiT, DINOv2 or Swin checkpoint."
        ) from exc


def apply_method(
    model: nn.Module,
    method: str,
    bottleneck_dim: int = 64,
    lora_rank: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    *,
    heads: Sequence[str] | None = None,
    lora_targets: Sequence[str] | str | None = None,
    mona_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Make ``model`` trainable the way ``method`` says (see :data:`~mona_peft.training.arguments.METHODS`), for
    any task.

    ``mona`` and ``lora`` return a ``PeftModel`` whose head is trained and saved through ``modules_to_save``;
    ``full`` and ``linear`` return the model itself with ``requires_grad`` set. ``heads`` are the task head's module
    names (default: :func:`head_module_names`, a classifier's); ``lora_targets`` are LoRA's ``target_modules``
    (default: the query/value projections, :func:`lora_target_modules`); ``mona_options`` are further
    :class:`~mona_peft.MonaConfig` fields (e.g. ``dropout``, ``init_weights``, ``prefix_tokens``).
    """
    from peft import LoraConfig, get_peft_model

    from .. import MonaConfig

    heads = list(heads) if heads is not None else head_module_names(model)
    if method == "mona":
        try:
            config = MonaConfig(bottleneck_dim=bottleneck_dim, modules_to_save=heads, **(mona_options or {}))
            return get_peft_model(model, config)
        except ValueError as exc:
            raise ModelError(
                f"--method mona cannot wrap {type(model).__name__}: {exc} Use a ViT/DeiT/DINOv2/Swin checkpoint, or "
                "--method lora/full/linear."
            ) from exc
    if method == "lora":
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=lora_targets if lora_targets is not None else lora_target_modules(model),
            lora_dropout=lora_dropout,
            modules_to_save=heads,
        )
        return get_peft_model(model, config)
    if method in ("full", "linear"):
        for name, param in model.named_parameters():
            param.requires_grad_(method == "full" or name.split(".", 1)[0] in heads)
        return model
    raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")


def prepare_model(
    model: nn.Module,
    model_args: Any,
    heads: Sequence[str] | None = None,
    lora_targets: Sequence[str] | str | None = None,
) -> nn.Module:
    """Apply ``model_args.method`` (with its options) to a freshly loaded task model; see :func:`apply_method`."""
    if fsdp_ram_efficient_loading():  # weights on `meta` here but on the main process: accelerate fills them in
        materialize_meta_parameters(model)
    return apply_method(
        model,
        model_args.method,
        bottleneck_dim=model_args.bottleneck_dim,
        lora_rank=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        heads=heads,
        lora_targets=lora_targets,
        mona_options=mona_config_options(model_args),
    )


def mona_config_options(model_args: Any) -> dict[str, Any]:
    """The :class:`~mona_peft.MonaConfig` fields the command line sets besides the bottleneck (``--mona_*``)."""
    init = {"zero": True, "official": "official"}[model_args.mona_init]
    return {"dropout": model_args.mona_dropout, "init_weights": init, "prefix_tokens": model_args.mona_prefix_tokens}


def build_model(model_args: ModelArguments, labels: list[str], model_path: str | None = None) -> nn.Module:
    """Load the backbone with a classification head for ``labels`` and apply ``model_args.method`` to it."""
    return prepare_model(load_classifier(model_args, labels, model_path), model_args)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a ``modules_to_save`` head is counted once."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:  # PEFT's frozen copy of a head that is trained as modules_to_save
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_kwargs(model: nn.Module, image_size: int) -> dict[str, Any]:
    """Extra forward arguments for inputs of ``image_size``: ``interpolate_pos_encoding=True`` for models that take it
    (ViT, DeiT, Swin) when the size differs from their pretraining size. DINOv2 always interpolates."""
    base = base_model(model)
    accepts = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
    native = getattr(base.config, "image_size", None)
    if accepts and native != image_size:
        return {"interpolate_pos_encoding": True}
    return {}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (it has adapters, saved on their own by ``save_pretrained``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")
