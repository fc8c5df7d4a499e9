"""The task head of a model: what Mona's ``modules_to_save`` defaults to.

Mona trains its adapters and the task head; the rest of the backbone stays frozen. The head is everything with
parameters outside the backbone. The backbone is the module that holds the adapted blocks and either is a bare model
of a block family (``config.model_type``: ``ViTModel``, ``Dinov2Model``, ``SwinModel``, the ``SwinBackbone`` that
``AutoBackbone`` builds inside dense-prediction models) or embeds the image itself (a vision tower with an
``embeddings`` or ``patch_embed`` child, e.g. ``CLIPVisionTransformer``, SAM's and Qwen2-VL's vision encoders). Text
towers (and modules named ``text_*``) and language models (whatever holds the model's token embeddings or LM head)
are never head. For example:

=======================================  ==================================================================
model                                    head (default ``modules_to_save``)
=======================================  ==================================================================
``ViTForImageClassification`` & co.      ``classifier`` (DeiT with teacher: both classifiers)
``UperNetForSemanticSegmentation``       ``decode_head``, ``auxiliary_head``
``Mask2FormerForUniversalSegmentation``  ``model.pixel_level_module.decoder``, ``model.transformer_module``,
                                         ``class_predictor``
``CLIPModel``                            ``visual_projection`` (the text tower stays frozen)
``LlavaForConditionalGeneration``        ``model.multi_modal_projector``
``SamModel``                             ``prompt_encoder``, ``mask_decoder``
``SwinModel``, ``CLIPVisionModel`` &     none
co. (bare towers), Qwen2-VL
=======================================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .families import BACKBONE_MODEL_TYPES


def is_backbone_model(module: nn.Module) -> bool:
    """Whether ``module`` is the bare model or the ``AutoBackbone`` of a family Mona supports (``ViTModel``,
    ``SwinBackbone``...), not a task model of that family (``ViTForImageClassification`` shares its config type)."""
    from transformers import PreTrainedModel

    if not isinstance(module, PreTrainedModel):
        return False
    if getattr(module.config, "model_type", None) not in BACKBONE_MODEL_TYPES:
        return False
    if hasattr(module, "out_features"):
        return True
    # The bare model is the class AutoModel builds for the config. ``base_model is module`` alone is not enough:
    # transformers 4.57's CLIPVisionModelWithProjection names a ``clip`` base model it does not have, so its
    # ``base_model`` is itself although ``visual_projection`` is a head.
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    bare = MODEL_MAPPING.get(type(module.config), None)
    return isinstance(module, bare) if bare is not None else module.base_model is module


# A module holding the blocks that has one of these children embeds the image itself: it is a vision tower (the
# backbone), e.g. CLIPVisionTransformer (``embeddings``) inside CLIPForImageClassification, SAM's and Qwen2-VL's
# vision encoders (``patch_embed``).
_TOWER_STEMS = ("embeddings", "patch_embed")


def _is_tower(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, stem, None), nn.Module) for stem in _TOWER_STEMS)


def _language_parts(model: nn.Module) -> list[nn.Module]:
    """The token embeddings and LM head of a model with a text side (CLIPModel, LLaVA, Qwen2-VL): whatever holds
    them is a text tower or a language model, never a default head."""
    parts = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(module, nn.Embedding) or (getter == "get_output_embeddings" and isinstance(module, nn.Linear)):
            parts.append(module)
    return parts


def task_head_modules(model: nn.Module, blocks: Iterable[str]) -> list[str] | None:
    """Dotted names of the modules of ``model`` that form its task head, given the names of the adapted ``blocks``.

    Walks down from ``model`` towards the blocks: a child that holds none of the blocks and has parameters is head; a
    child that is the backbone (:func:`is_backbone_model`) is left alone; any other child holding blocks (e.g.
    Mask2Former's ``model.pixel_level_module``) is searched the same way. Returns ``[]`` when ``model`` is itself a
    backbone, and ``None`` when some block does not sit inside a recognised backbone, so that no guess is made about
    an unfamiliar model.
    """
    block_names = [name for name in blocks if name]
    if not block_names:
        return None
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    heads = _heads_below(model, "", block_names, _language_parts(model))
    if heads is None:
        return None
    # A module whose every parameter is tied to one outside it (SamModel's shared_image_embedding, tied to the prompt
    # encoder's on transformers 5.x) is a view of weights that belong elsewhere: a trained copy would break the tie.
    return [h for h in heads if not _all_tied_elsewhere(model.get_submodule(h), h, owners)]


def _all_tied_elsewhere(module: nn.Module, path: str, owners: dict[int, list[str]]) -> bool:
    params = list(module.parameters())
    return bool(params) and all(any(not name.startswith(path + ".") for name in owners[id(p)]) for p in params)


def _heads_below(module: nn.Module, prefix: str, blocks: list[str], language: list[nn.Module]) -> list[str] | None:
    if is_backbone_model(module) or _is_tower(module):
        return []
    heads: list[str] = []
    for name, child in module.named_children():
        path = prefix + name
        inside = [b for b in blocks if b == path or b.startswith(path + ".")]
        if not inside:
            is_text = name.startswith("text") or any(part is child or _contains(child, part) for part in language)
            if not is_text and any(True for _ in child.parameters()):
                heads.append(path)
            continue
        if path in inside:  # reached a block without passing through a backbone model
            return None
        below = _heads_below(child, path + ".", inside, language)
        if below is None:
            return None
        heads += below
    return heads


def _contains(module: nn.Module, part: nn.Module) -> bool:
    return any(sub is part for sub in module.modules())
