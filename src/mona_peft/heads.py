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
``DetrForObjectDetection``               ``model.input_projection``, ``model.query_position_embeddings``,
                                         ``model.encoder``, ``model.decoder``, ``class_labels_classifier``,
                                         ``bbox_predictor``
``DeformableDetrForObjectDetection``     ``model.input_proj.N``, ``model.query_position_embeddings``,
                                         ``model.encoder``, ``model.decoder`` (or their parts),
                                         ``model.reference_points``,
                                         one entry per distinct ``class_embed.N`` / ``bbox_embed.N`` (see below)
``GroundingDinoForObjectDetection``      as Deformable DETR (``model.input_proj_vision.N``, ``model.enc_output``...);
                                         the text encoder (``model.text_backbone``) and ``model.text_projection``
                                         stay frozen
``SwinModel``, ``CLIPVisionModel`` &     none
co. (bare towers), Qwen2-VL
=======================================  ==================================================================

Per-level heads. PEFT's ``modules_to_save`` cannot hold a ``ModuleList``, and detectors keep their per-level class and
box heads in ``ModuleList`` entries that are the *same* module repeated (transformers 4.57), or distinct modules with
tied parameters (5.x), sometimes reached from two places (Deformable DETR with box refinement and Grounding DINO:
``bbox_embed`` is also ``model.decoder.bbox_embed``). Training one path and leaving the others on the frozen original
would silently leave predictions untrained. So a head that is a ``ModuleList``, or that holds a list entry shared with
something outside it, is replaced by its children (recursively); entries that are one module or tied twins form one
group, named once (by a path no other module path ends with, since PEFT matches names by suffix), and
:func:`share_saved_modules` points every path of a group at that one trained copy after PEFT has wrapped it. Where no
such name exists the default is refused (:class:`ValueError`) rather than guessed. Bare parameters of the modules on
the way to the backbone (Deformable DETR's and Grounding DINO's ``model.level_embed``) cannot be a ``modules_to_save``
entry and stay frozen.
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
    heads = [h for h in heads if not _all_tied_elsewhere(model.get_submodule(h), h, owners)]
    return _split_shared_heads(model, heads)


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


# ------------------------------------------------------------------------------------------------ per-level heads
def twin_key(module: nn.Module) -> tuple:
    """Modules with the same key compute the same function from the same weights: the same object, or distinct
    modules of one class whose parameters and buffers are all the same tensors (transformers 5.x ties the per-level
    heads of detectors this way). Modules without parameters are only twins of themselves."""
    params = tuple((n, id(p)) for n, p in module.named_parameters(remove_duplicate=False))
    if not params:
        return ("object", id(module))
    buffers = tuple((n, id(b)) for n, b in module.named_buffers(remove_duplicate=False))
    return (type(module), params, buffers)


def _alias_groups(model: nn.Module) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            groups.setdefault(twin_key(module), []).append(path)
    return groups


def _split_shared_heads(model: nn.Module, heads: list[str]) -> list[str]:
    """``heads`` as names that PEFT's ``modules_to_save`` wraps consistently (see the module docstring): a head that
    is a list, holds a list entry shared with something outside it, or has no name of its own under PEFT's suffix
    match is replaced by its parts; one name per group of modules that are one module or tied twins."""
    lists = (nn.ModuleList, nn.ModuleDict)
    groups = _alias_groups(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    all_paths = [path for path in modules if path]
    shared_entries = [
        path
        for members in groups.values()
        if len(members) > 1
        for path in members
        if isinstance(modules.get(path.rpartition(".")[0]), lists)
    ]

    def group_of(path: str) -> list[str]:
        return groups[twin_key(modules[path])]

    def must_split(head: str) -> bool:
        if isinstance(modules[head], lists):
            return True
        # a shared entry inside the head is fine if all its other paths lie inside the head or inside its twins
        homes = tuple(member + "." for member in group_of(head))
        inside = [p for p in shared_entries if p.startswith(head + ".")]
        return any(not member.startswith(homes) for p in inside for member in group_of(p))

    names: list[str] = []
    named: set[tuple] = set()

    def add(head: str) -> None:
        module = modules[head]
        key = twin_key(module)
        if key in named or not any(True for _ in module.parameters()):
            return
        name = None if must_split(head) else _unambiguous_name(group_of(head), all_paths)
        if name is not None:
            named.add(key)
            names.append(name)
            return
        children = [f"{head}.{child}" for child, _ in module.named_children()]
        bare = [n for n, p in module.named_parameters(recurse=False)]
        if bare or not children:
            what = f"its parameters {', '.join(bare)}" if bare else "it"
            raise ValueError(
                f"Mona cannot train {head} ({type(module).__name__}) of {type(model).__name__} through PEFT's "
                f"modules_to_save: {what} cannot be named without also matching other modules (PEFT matches "
                "modules_to_save by name suffix) or without splitting weights it shares with other paths. Pass "
                "`modules_to_save` explicitly (a list of module paths; [] trains Mona only)."
            )
        for child in children:
            add(child)

    for head in heads:
        add(head)
    return names


def _unambiguous_name(members: list[str], all_paths: list[str]) -> str | None:
    """A path of the group that PEFT's suffix match (``key.endswith(name)``) finds nowhere else in the model."""
    for name in sorted(members, key=lambda p: (p.count("."), p)):
        if all(path == name or not path.endswith(name) for path in all_paths):
            return name
    return None


def share_saved_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Point every path of ``model`` that holds a module wrapped by ``modules_to_save`` (the same object, or a tied
    twin, see :func:`twin_key`) at that one wrapper, so that every forward path uses the trained copy and tied weights
    stay tied. Returns ``(parent, name, module it replaced)`` for each path changed; unloading puts the module that
    PEFT puts at the wrapper's own path (the trained copy) at each of them."""
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    wrappers = {
        twin_key(module.original_module): module
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
    }
    if not wrappers:
        return []
    changed = []
    for path, module in list(model.named_modules(remove_duplicate=False)):
        parts = path.split(".")
        if not path or "original_module" in parts or "modules_to_save" in parts:
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            continue
        wrapper = wrappers.get(twin_key(module))
        if wrapper is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, wrapper)
        changed.append((parent, name, module))
    return changed
