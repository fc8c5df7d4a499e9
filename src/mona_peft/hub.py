"""Share Mona adapters on the Hugging Face Hub with a proper PEFT model card.

``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter (PEFT writes its own
card), then overwrites ``README.md`` with a generic *transformers* card (``library_name: transformers``). Importing
``mona_peft`` wraps ``PeftModel.push_to_hub`` once so that a PeftModel holding **Mona** adapters is pushed by
:func:`push_adapter_to_hub` instead, which writes the card built by :func:`build_model_card`; every other PeftModel
(LoRA & co.) goes to the original method untouched.

Loading needs nothing from here (``PeftModel.from_pretrained(base, "user/repo")`` works once ``mona_peft`` is
imported); :func:`load_from_hub` does the same with clear errors for a missing repo, revision, file or a non-Mona
adapter.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel
from peft.utils import PeftType, get_peft_model_state_dict

from .config import MonaConfig
from .model_card import (
    MONA_PAPER_URL,
    CardMetadata,
    CardSection,
    as_list,
    build_card,
    framework_versions,
    hub_model_id,
    markdown_table,
)

CONFIG_NAME = "adapter_config.json"
NO_TOKEN_MESSAGE = (
    "Pushing to the Hub needs a Hugging Face token with write access, and none was found. Pass `token=...`, set the "
    "HF_TOKEN environment variable, or run `hf auth login` (older clients: `huggingface-cli login`). Nothing was "
    "created or uploaded."
)
_TASKS_BY_CLASS_SUFFIX = (
    ("ForImageClassificationWithTeacher", "image-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("Backbone", "image-feature-extraction"),
    ("Model", "image-feature-extraction"),
)


class MonaHubError(ValueError):
    """A Mona adapter cannot be pushed to or loaded from the Hub as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------
def holds_mona_adapter(model: Any) -> bool:
    """Whether ``model`` is a ``PeftModel`` whose adapters are Mona adapters."""
    configs = getattr(model, "peft_config", None)
    return (
        isinstance(model, PeftModel)
        and isinstance(configs, Mapping)
        and any(getattr(config, "peft_type", None) == PeftType.MONA for config in configs.values())
    )


def infer_task(model_class_name: str) -> str | None:
    """The Hub ``pipeline_tag`` of a transformers vision model class, e.g. ``image-classification``."""
    for suffix, task in _TASKS_BY_CLASS_SUFFIX:
        if model_class_name.endswith(suffix):
            return task
    return None


def adapter_path(adapter_name: str, subfolder: str | None = None) -> str:
    """Where ``PeftModel.save_pretrained`` puts an adapter, relative to the repo root ("" for the root)."""
    return posixpath.join(subfolder or "", "" if adapter_name == "default" else adapter_name).strip("/")


def _base_model_id(model: PeftModel, adapter_names: Sequence[str]) -> str | None:
    for name in adapter_names:
        found = hub_model_id(model.peft_config[name].base_model_name_or_path)
        if found:
            return found
    return hub_model_id(getattr(model.get_base_model(), "name_or_path", None))


def _load_snippet(
    base_class: str,
    base_id: str | None,
    repo_id: str,
    path: str,
    adapter_name: str,
    revision: str | None,
    num_labels: int | None,
) -> str:
    hub_args = "".join([f', subfolder="{path}"' if path else "", f', revision="{revision}"' if revision else ""])
    base_args = f", num_labels={num_labels}, ignore_mismatched_sizes=True" if num_labels else ""
    base_ref = f'"{base_id}"' if base_id else '"<the base model this adapter was trained on>"'
    lines = [
        "import mona_peft  # registers the Mona method with PEFT: import it before loading the adapter",
        "from peft import PeftModel",
        f"from transformers import {base_class}",
        "",
        f"base = {base_class}.from_pretrained({base_ref}{base_args})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{hub_args})',
    ]
    if path:
        suggested = adapter_name if adapter_name != "default" else posixpath.basename(path)
        lines += [
            "# or next to an adapter that is already loaded:",
            f'# model.load_adapter("{repo_id}", adapter_name="{suggested}"{hub_args})',
        ]
    return "\n".join(lines)


def _adapter_section(
    model: PeftModel,
    adapter_name: str,
    repo_id: str,
    path: str,
    base_id: str | None,
    task: str | None,
    datasets: Sequence[str],
    metrics: Mapping[str, float],
    revision: str | None,
) -> CardSection:
    config: MonaConfig = model.peft_config[adapter_name]
    base = model.get_base_model()
    import transformers

    base_class = type(base).__name__ if hasattr(transformers, type(base).__name__) else "AutoModel"
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    blocks = sorted({key.partition(".mona_")[0] for key in state if ".mona_" in key})
    heads = sorted(config.modules_to_save or [])
    num_labels = getattr(getattr(base, "config", None), "num_labels", None) if heads else None
    endpoint = huggingface_hub.constants.ENDPOINT.rstrip("/")
    rows = [
        (
            "Base model",
            f"[`{base_id}`]({endpoint}/{base_id}) (`{type(base).__name__}`)"
            if base_id
            else f"`{type(base).__name__}` (not on the Hub)",
        ),
        ("Task", task or "-"),
        (
            "Mona",
            f"bottleneck_dim {config.bottleneck_dim}, kernel sizes {', '.join(map(str, config.kernel_sizes))}, "
            f"after {' and '.join(config.positions)}, prefix tokens {config.prefix_tokens}",
        ),
        ("Adapted blocks", str(len(blocks))),
        ("Also trained and saved", ", ".join(f"`{h}`" for h in heads) or "-"),
        ("Parameters in the adapter file", f"{sum(t.numel() for t in state.values()):,}"),
    ]
    if datasets:
        rows.append(("Dataset", ", ".join(f"[`{d}`]({endpoint}/datasets/{d})" for d in datasets)))
    if metrics:
        rows.append(("Results", ", ".join(f"{name} {value:g}" for name, value in metrics.items())))
    snippet = _load_snippet(base_class, base_id, repo_id, path, adapter_name, revision, num_labels)
    return CardSection(
        f"Adapter `{adapter_name}` ({f'`{path}/`' if path else 'the repository root'})",
        [
            *markdown_table(["", ""], rows),
            "",
            "### How to load",
            "",
            f"```python\n{snippet}\n```",
            "",
            f"Framework versions: {framework_versions()}.",
        ],
        key=f"adapter: {path or '.'}",
    )


def _intro(base_id: str | None) -> list[str]:
    endpoint = huggingface_hub.constants.ENDPOINT.rstrip("/")
    base = f" for [`{base_id}`]({endpoint}/{base_id})" if base_id else ""
    return [
        f"[Mona]({MONA_PAPER_URL}) (the multi-cognitive visual adapter, Yin et al., CVPR 2025) adapter weights{base}, "
        "made with [PEFT](https://github.com/huggingface/peft) and `mona_peft`.",
        "",
        "Mona is not built into PEFT: install the `mona_peft` package and `import mona_peft` before loading "
        "(the import registers the method; without it PEFT fails with `KeyError: 'MONA'`). Mona adds small adapters "
        "on the residual stream of every transformer block; it cannot be merged into the base weights.",
    ]


def build_model_card(
    model: PeftModel,
    repo_id: str,
    *,
    existing: ModelCard | None = None,
    adapter_names: Sequence[str] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
    task: str | None = None,
    datasets: str | Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """The model card of a repo after pushing ``model``'s Mona adapters to it (no network access), made by
    :func:`mona_peft.model_card.build_card`.

    Args:
        model: a ``PeftModel`` holding Mona adapters.
        repo_id: the repository, ``namespace/name``.
        existing: the card already in the repo at that revision, if any. Its metadata is kept and extended, and so is
            any text written by a person; the sections this function wrote before (one per adapter path, between
            ``<!-- mona_peft adapter: ... -->`` markers) are replaced. A generated boilerplate card is replaced.
        adapter_names: the adapters being pushed (default: all of them).
        subfolder: the folder of the repo the adapters are pushed to (``None``: the root).
        revision: the branch pushed to, shown in the loading example when it is not ``main``.
        base_model: Hub id of the base model; default: the adapters' ``base_model_name_or_path`` or the base model's
            ``name_or_path`` when they name a Hub repo (local paths are left out: the Hub refuses them).
        task: Hub ``pipeline_tag``; default: inferred from the base model class (e.g. ``image-classification``).
        datasets: Hub dataset id(s) the adapters were trained on.
        metrics: evaluation results, e.g. ``{"accuracy": 0.91}``; with a dataset and a task they also go into the
            card's ``model-index`` (one per repo: a result for the same task, dataset and metric is replaced).
            ``datasets`` and ``metrics`` describe every adapter pushed in this call; push adapters one at a time
            (``selected_adapters``) to describe them separately.
        tags: extra tags; ``mona`` and ``peft`` are always there.
    """
    names = list(adapter_names or model.peft_config)
    base_id = base_model or _base_model_id(model, names)
    base = model.get_base_model()
    inferred = infer_task(type(base).__name__)
    task = task or inferred
    datasets = as_list(datasets)
    metrics = dict(metrics or {})
    sections = [
        _adapter_section(
            model, name, repo_id, adapter_path(name, subfolder), base_id, task, datasets, metrics, revision
        )
        for name in names
    ]
    metadata = CardMetadata(
        library_name="peft",
        pipeline_tag=task,
        keep_pipeline_tag=task == inferred,
        base_model=base_id,
        datasets=datasets,
        results=metrics,
        tags=["mona", "peft", "transformers", "vision", *as_list(getattr(base, "model_tags", None)), *as_list(tags)],
    )
    return build_card(repo_id.split("/")[-1], _intro(base_id), sections, metadata, existing)


# ---------------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------------
def _resolve_token(token: str | bool | None) -> str:
    if token is False:
        raise MonaHubError(
            "token=False disables authentication, but pushing to the Hub needs a token. " + NO_TOKEN_MESSAGE
        )
    resolved = token if isinstance(token, str) else huggingface_hub.get_token()
    if not resolved:
        raise MonaHubError(NO_TOKEN_MESSAGE)
    return resolved


def _remote_card(api: HfApi, repo_id: str, revision: str | None, cache_dir: str) -> ModelCard | None:
    try:
        path = hf_hub_download(
            repo_id, "README.md", revision=revision, token=api.token, cache_dir=cache_dir, endpoint=api.endpoint
        )
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):
            raise
        return None
    return ModelCard.load(path, ignore_metadata_errors=True)


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    selected_adapters: Sequence[str] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    base_model: str | None = None,
    task: str | None = None,
    datasets: str | Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Sequence[str] | None = None,
) -> huggingface_hub.CommitInfo:
    """Push the Mona adapter(s) of ``model`` to the Hub repo ``repo_id`` with a PEFT model card, in one commit.

    ``model.push_to_hub(repo_id, ...)`` comes here for Mona adapters (after ``import mona_peft``), with the same
    arguments. The repo is created if needed (``private`` only applies then), ``revision`` names a branch that is
    created from ``main`` if it does not exist yet. Load the result with
    ``PeftModel.from_pretrained(base, repo_id, subfolder=..., revision=...)``.

    Args:
        model: a ``PeftModel`` holding Mona adapters.
        repo_id: ``namespace/name`` (a bare name goes to the token owner's namespace).
        token: a token with write access; default: the logged-in token (``HF_TOKEN`` or ``hf auth login``).
        private: make a newly created repo private.
        revision: branch to push to (default ``main``).
        subfolder: folder of the repo to put the adapter files in, to keep several adapters in one repo. The adapter
            ``default`` goes to ``subfolder``, any other adapter to ``subfolder/<name>`` (as ``save_pretrained``
            lays them out).
        selected_adapters: which adapters to push (default: all).
        commit_message, commit_description, create_pr: as for ``HfApi.create_commit``.
        safe_serialization: ``True`` writes ``adapter_model.safetensors``, ``False`` ``adapter_model.bin``.
        base_model, task, datasets, metrics, tags: for the model card, see :func:`build_model_card`.

    Returns:
        The ``CommitInfo`` of the commit (``.oid``, ``.commit_url``, ``.pr_url``).

    Raises:
        MonaHubError: no token, or ``model`` holds no Mona adapter (push other adapters with ``model.push_to_hub``).
    """
    if not holds_mona_adapter(model):
        raise MonaHubError(
            f"push_adapter_to_hub pushes Mona adapters, but {type(model).__name__} holds none; push other PEFT "
            "adapters with model.push_to_hub(...)."
        )
    names = list(selected_adapters) if selected_adapters is not None else list(model.peft_config)
    unknown = [name for name in names if name not in model.peft_config]
    if unknown or not names:
        raise MonaHubError(f"Unknown adapter(s) {unknown or names}; this model has {list(model.peft_config)}.")
    if subfolder is not None:
        subfolder = subfolder.strip("/")
        if not subfolder or ".." in subfolder.split("/"):
            raise MonaHubError(f"subfolder must be a relative folder inside the repo, got {subfolder!r}.")
    api = HfApi(token=_resolve_token(token))

    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="mona-push-") as tmp:
        existing = _remote_card(api, repo_id, revision, cache_dir=os.path.join(tmp, "cache"))
        staging = Path(tmp, "upload")
        target = staging / subfolder if subfolder else staging
        model.save_pretrained(str(target), selected_adapters=names, safe_serialization=safe_serialization)
        (target / "README.md").unlink(missing_ok=True)  # PEFT's card; the repo's card is written below
        card = build_model_card(
            model,
            repo_id,
            existing=existing,
            adapter_names=names,
            subfolder=subfolder,
            revision=None if revision in (None, "main") or revision.startswith("refs/pr/") else revision,
            base_model=base_model,
            task=task,
            datasets=datasets,
            metrics=metrics,
            tags=tags,
        )
        card.save(staging / "README.md")
        operations = [
            CommitOperationAdd(path_in_repo=file.relative_to(staging).as_posix(), path_or_fileobj=str(file))
            for file in sorted(staging.rglob("*"))
            if file.is_file()
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload Mona adapter{'s' if len(names) > 1 else ''} {', '.join(names)}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


# Arguments of transformers' PushToHubMixin.push_to_hub (4.57 and 5.x) that do not apply to a PEFT adapter.
_IGNORED_PUSH_ARGS = ("max_shard_size", "use_temp_dir")


def _push_to_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for name in _IGNORED_PUSH_ARGS:
        kwargs.pop(name, None)
    if "use_auth_token" in kwargs:  # transformers 4.x spelling
        value = kwargs.pop("use_auth_token")
        if kwargs.get("token") is None:
            kwargs["token"] = value
    return kwargs


def install_push_to_hub_card_fix() -> None:
    """Make ``PeftModel.push_to_hub`` write a Mona card for PeftModels holding Mona adapters (idempotent).

    Wraps the method on the ``PeftModel`` class once; the wrapper calls :func:`push_adapter_to_hub` for Mona adapters
    and the original method, unchanged, for every other PeftModel.
    """
    original = PeftModel.push_to_hub
    if getattr(original, "_mona_peft_original", None) is not None:
        return

    @functools.wraps(original)
    def push_to_hub(self: PeftModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not holds_mona_adapter(self):
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub() of a Mona adapter takes keyword arguments after repo_id")
        return push_adapter_to_hub(self, repo_id, **_push_to_hub_kwargs(kwargs))

    push_to_hub._mona_peft_original = original  # type: ignore[attr-defined]
    PeftModel.push_to_hub = push_to_hub


# ---------------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------------
def _where(repo_id: str, subfolder: str | None, revision: str | None) -> str:
    return (
        f"{repo_id!r}"
        + (f", subfolder {subfolder!r}" if subfolder else "")
        + (f", revision {revision!r}" if revision else "")
    )


def _adapter_folders(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # only used to improve an error message
        return []
    return sorted(posixpath.dirname(f) or "." for f in files if posixpath.basename(f) == CONFIG_NAME)


def _branches(repo_id: str, token: str | bool | None) -> list[str]:
    try:
        return sorted(ref.name for ref in HfApi().list_repo_refs(repo_id, token=token).branches)
    except Exception:  # only used to improve an error message
        return []


def read_adapter_config(
    repo_id_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **download_kwargs: Any,
) -> dict[str, Any]:
    """Read ``adapter_config.json`` of a Hub repo (or local folder) and check that it is a Mona adapter.

    Raises :class:`MonaHubError` saying what is wrong: no such repo (or private without a token that can read it), no
    such revision, no adapter there (with the subfolders that do hold one), or an adapter of another PEFT method.
    """
    source = str(repo_id_or_path)
    local = Path(source, subfolder) if subfolder else Path(source)
    where = _where(source, subfolder, revision)
    if local.is_dir():
        config_file = local / CONFIG_NAME
        if not config_file.is_file():
            raise MonaHubError(f"{local} has no {CONFIG_NAME}: it does not hold a PEFT adapter.")
    else:
        try:
            config_file = Path(
                hf_hub_download(
                    source, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token, **download_kwargs
                )
            )
        except RepositoryNotFoundError as exc:
            hint = (
                "the token given cannot read it"
                if token
                else "it is private and no token was found (pass token=..., set HF_TOKEN or run `hf auth login`)"
            )
            raise MonaHubError(
                f"There is no model repository {source!r} on {huggingface_hub.constants.ENDPOINT}, or {hint}."
            ) from exc
        except RevisionNotFoundError as exc:
            branches = _branches(source, token)
            known = f" Its branches: {', '.join(branches)}." if branches else ""
            raise MonaHubError(f"Repository {source!r} has no revision {revision!r}.{known}") from exc
        except LocalEntryNotFoundError as exc:
            raise MonaHubError(
                f"Cannot reach the Hub to read {CONFIG_NAME} from {where}, and it is not in the local cache: {exc}"
            ) from exc
        except EntryNotFoundError as exc:
            folders = _adapter_folders(source, revision, token)
            hint = (
                f" Adapters in this repo: {', '.join(repr(f) for f in folders)} (pass subfolder=...)."
                if folders
                else " The repo holds no PEFT adapter."
            )
            raise MonaHubError(f"There is no {CONFIG_NAME} in {where}.{hint}") from exc
        except HFValidationError as exc:
            raise MonaHubError(f"{source!r} is neither a local folder nor a valid Hub repo id: {exc}") from exc
        except HfHubHTTPError as exc:
            raise MonaHubError(f"The Hub refused to serve {CONFIG_NAME} from {where}: {exc}") from exc

    config = json.loads(config_file.read_text())
    peft_type = config.get("peft_type")
    if peft_type != PeftType.MONA.value:
        raise MonaHubError(
            f"{where} holds a {peft_type} adapter, not a Mona adapter; load it with "
            "peft.PeftModel.from_pretrained(...) (mona_peft is only needed for Mona adapters)."
        )
    return config


# Download arguments of PeftModel.from_pretrained / load_adapter that also apply to reading adapter_config.json.
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies")


def load_from_hub(
    model: Any,
    repo_id_or_path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Load a Mona adapter from the Hub (or a local folder) onto ``model``, with clear errors.

    ``model`` is either the base model (a new ``PeftModel`` is returned, as ``PeftModel.from_pretrained``) or a
    ``PeftModel`` that already holds Mona adapters (the adapter is added as ``adapter_name``, as ``load_adapter``, and
    the same ``PeftModel`` is returned). Before anything is changed, the adapter config is read and checked (see
    :func:`read_adapter_config`) and the weights are checked against the model (``MonaCheckpointError``).
    """
    download_kwargs = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if kwargs.get(k) is not None}
    read_adapter_config(repo_id_or_path, subfolder=subfolder, revision=revision, token=token, **download_kwargs)
    hub_kwargs = {
        k: v for k, v in {"subfolder": subfolder, "revision": revision, "token": token}.items() if v is not None
    }
    if isinstance(model, PeftModel):
        model.load_adapter(
            str(repo_id_or_path), adapter_name=adapter_name, is_trainable=is_trainable, **hub_kwargs, **kwargs
        )
        return model
    return PeftModel.from_pretrained(
        model, str(repo_id_or_path), adapter_name=adapter_name, is_trainable=is_trainable, **hub_kwargs, **kwargs
    )


install_push_to_hub_card_fix()
