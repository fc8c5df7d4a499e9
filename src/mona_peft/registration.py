"""Teach PEFT about Mona: add ``MONA`` to ``PeftType`` and register the config/tuner classes.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` refuses names that are not members of it,
so a third-party method has to add its member at run time. This module does that once, idempotently.
"""

from __future__ import annotations

import enum

SUPPORTED_PEFT = ">=0.21,<0.22"
PEFT_TYPE_NAME = "MONA"
PREFIX = "mona_"


class PeftExtensionError(ImportError):
    """Raised when the installed PEFT cannot be extended with the Mona method."""


def extend_str_enum(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add the member ``name = value`` to an existing ``str``-mixin enum and return it.

    Idempotent: if a member with this name already exists it is returned unchanged (and must carry ``value``).
    Works on CPython 3.10-3.13, where enum members live in ``_member_map_`` / ``_value2member_map_`` /
    ``_member_names_`` and are reachable as class attributes.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member with value {value!r}")
    if not issubclass(enum_cls, str):
        raise TypeError(f"{enum_cls.__name__} is not a str enum")

    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    # ``EnumType.__setattr__`` refuses to rebind members, so go through ``type``.
    type.__setattr__(enum_cls, name, member)
    return member


def register_with_peft() -> None:
    """Register Mona with PEFT (safe to call more than once)."""
    try:
        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import PeftType, register_peft_method
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PeftExtensionError(
            f"mona_peft needs PEFT {SUPPORTED_PEFT} with `register_peft_method`; install it with "
            f"`pip install 'peft{SUPPORTED_PEFT}'` (import failed: {exc})"
        ) from exc

    from .config import MonaConfig
    from .model import MonaModel

    try:
        peft_type = extend_str_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    except (AttributeError, TypeError, ValueError) as exc:  # pragma: no cover - depends on the environment
        raise PeftExtensionError(
            f"Cannot add MONA to peft.PeftType in peft {peft.__version__}; mona_peft supports peft {SUPPORTED_PEFT}."
        ) from exc

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if registered is MonaConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is MonaModel:
            return
        raise PeftExtensionError(
            f"Another package already registered a PEFT method named 'mona' ({registered!r}); "
            "mona_peft cannot register its own."
        )
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MonaConfig, model_cls=MonaModel, prefix=PREFIX)
