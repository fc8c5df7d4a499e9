"""Configuration of the Mona PEFT method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

POSITIONS = ("attention", "mlp")
PREFIX_TOKEN_MODES = ("tokenwise", "unchanged")


@dataclass
class MonaConfig(PeftConfig):
    """Configuration of a Mona adapter (Yin et al., "5%>100%", CVPR 2025, arXiv 2408.08345).

    Mona adds a small multi-cognitive adapter on the residual stream of every transformer block, right after the
    attention residual add and right after the MLP residual add. Each module is
    ``x + up(dropout(gelu(proj(filter(down(LN(x) * s1 + x * s2))))))`` where ``filter`` averages depthwise convs of
    several kernel sizes over the token grid.

    Args:
        target_modules (`list[str] | str`, *optional*):
            Names (or one regex) of the transformer *blocks* to adapt (Mona wraps whole blocks, not Linear layers).
            Default `None` chooses every supported block of the model (the families of docs/families.md: ViT, DeiT,
            DINOv2, DINOv3, Swin, Swinv2, BEiT, the vision towers of CLIP, SigLIP, SigLIP2, SAM and Qwen2-VL, also
            inside another model such as UperNet or LLaVA); blocks of a text tower are never chosen.
        exclude_modules (`list[str] | str`, *optional*):
            Block names (or one regex) to leave untouched.
        bottleneck_dim (`int`, defaults to 64):
            Width `m` of Mona's bottleneck, the same at every stage as in the paper (which found 64 best of 32/64/128).
        kernel_sizes (`tuple[int, ...]`, defaults to `(3, 5, 7)`):
            Odd, positive depthwise kernel sizes whose outputs are averaged ("multi-cognitive" filters).
        dropout (`float`, defaults to 0.1):
            Dropout after the GELU, as in the official code.
        init_weights (`bool | "official"`, defaults to `True`):
            `True`: the official init except a zero up-projection, so a fresh adapter leaves the model's output
            exactly unchanged (PEFT's convention; `disable_adapter()` and a new adapter agree). `"official"`: the
            official Mona init (truncated-normal linears, s1 = 1e-6, s2 = 1), which is near-identity only. `False`:
            like `"official"`, meant for tests that need a non-trivial adapter.
        positions (`tuple[str, ...]`, defaults to `("attention", "mlp")`):
            Which of the two Monas per block to use: after the attention residual add, after the MLP residual add.
        prefix_tokens (`"tokenwise" | "unchanged"`, defaults to `"tokenwise"`):
            How ViT-family prefix tokens (CLS, DeiT's distillation token, DINOv2 registers) are treated. They have no
            place on the patch grid, so the depthwise filter skips them (its own identity skip passes them on) in both
            modes. `"tokenwise"`: they go through every token-wise part of Mona (scaled norm, projections, projector,
            GELU). `"unchanged"`: Mona leaves them exactly as they are. Swin has no prefix tokens.
        modules_to_save (`list[str]`, *optional*):
            Modules trained and saved in full besides the adapter (PEFT matches them by name suffix). Default `None`:
            the model's task head, i.e. every module with parameters outside the adapted backbone, chosen when the
            adapter is created and written to adapter_config.json: `["classifier"]` for image classifiers,
            `["decode_head", "auxiliary_head"]` for UperNet, `["model.pixel_level_module.decoder",
            "model.transformer_module", "class_predictor"]` for Mask2Former, nothing for a bare backbone or an
            unfamiliar model (see `mona_peft.heads`). An explicit list always wins; `[]` trains no head.
        block_family (`str`, *optional*):
            The block family of the adapted blocks (`"vit"`, `"clip"`, `"siglip"`...), filled in when the adapter is
            created and saved with it. A config that names a family only adapts blocks of that family, so an adapter
            is never loaded onto another architecture whose blocks merely have the same widths and paths (CLIP's and
            SigLIP's vision towers). Adapters saved before this field existed load as before.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names or a regex of the transformer blocks to adapt; None = every supported block of the model."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of blocks to leave untouched."}
    )
    bottleneck_dim: int = field(default=64, metadata={"help": "Width of Mona's bottleneck (paper: 64)."})
    kernel_sizes: tuple[int, ...] = field(
        default=(3, 5, 7), metadata={"help": "Odd positive depthwise kernel sizes whose outputs are averaged."}
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout probability after the GELU."})
    init_weights: bool | Literal["official"] = field(
        default=True,
        metadata={
            "help": "True: exact identity at init (zero up-projection). 'official': the official near-identity init. "
            "False: official init, for tests."
        },
    )
    positions: tuple[str, ...] = field(
        default=POSITIONS, metadata={"help": "Which Monas to add per block: 'attention' and/or 'mlp'."}
    )
    prefix_tokens: Literal["tokenwise", "unchanged"] = field(
        default="tokenwise",
        metadata={"help": "'tokenwise': prefix tokens get Mona's token-wise parts; 'unchanged': left as they are."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained and saved in full besides the adapter; None = the model's task head (e.g. "
            "['classifier'], UperNet's ['decode_head', 'auxiliary_head']); [] = none."
        },
    )

    block_family: str | None = field(
        default=None,
        metadata={
            "help": "The block family the adapter was made for (e.g. 'clip', 'siglip'; see docs/families.md). Set "
            "when the adapter is created and saved with it: an adapter is only loaded onto blocks of its family."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MONA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules) if len(self.target_modules) > 1 else self.target_modules
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

        if (
            isinstance(self.bottleneck_dim, bool)
            or not isinstance(self.bottleneck_dim, int)
            or self.bottleneck_dim < 1
        ):
            raise ValueError(f"MonaConfig.bottleneck_dim must be a positive integer, got {self.bottleneck_dim!r}.")

        if isinstance(self.kernel_sizes, int):
            self.kernel_sizes = (self.kernel_sizes,)
        kernels = tuple(self.kernel_sizes)
        if not kernels:
            raise ValueError("MonaConfig.kernel_sizes must name at least one kernel size, e.g. (3, 5, 7).")
        for k in kernels:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(
                    f"MonaConfig.kernel_sizes must be odd positive integers (same-size padding needs an odd kernel), "
                    f"got {k!r} in {kernels}."
                )
        if len(set(kernels)) != len(kernels):
            raise ValueError(f"MonaConfig.kernel_sizes has duplicates: {kernels}.")
        self.kernel_sizes = kernels

        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"MonaConfig.dropout must be a probability in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)

        if not (self.init_weights is True or self.init_weights is False or self.init_weights == "official"):
            raise ValueError(f"MonaConfig.init_weights must be True, False or 'official', got {self.init_weights!r}.")

        if isinstance(self.positions, str):
            self.positions = (self.positions,)
        positions = tuple(self.positions)
        unknown = [p for p in positions if p not in POSITIONS]
        if not positions or unknown or len(set(positions)) != len(positions):
            raise ValueError(
                f"MonaConfig.positions must be a non-empty subset of {POSITIONS} without repeats, got {positions}."
            )
        # Canonical order: the attention Mona always runs before the MLP Mona inside a block.
        self.positions = tuple(p for p in POSITIONS if p in positions)

        if self.prefix_tokens not in PREFIX_TOKEN_MODES:
            raise ValueError(
                f"MonaConfig.prefix_tokens must be one of {PREFIX_TOKEN_MODES}, got {self.prefix_tokens!r}."
            )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Drop fields that earlier versions saved but that are runtime choices now (``merge_filters`` of 0.1.0: see
        :func:`mona_peft.set_compute`), so that their adapters load without a warning."""
        for name in _RETIRED_FIELDS:
            kwargs.pop(name, None)
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load a saved adapter's config, after checking that its weights are readable and agree with it.

        This runs before ``PeftModel.from_pretrained`` changes the model, so a corrupted or mismatched adapter fails
        with :class:`~mona_peft.checkpoint.MonaCheckpointError` and leaves the model as it was. Nothing is kept on the
        returned config: it can be reused for a new adapter on another model.
        """
        from .checkpoint import check_consistent, read_weights

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, MonaConfig):  # PeftConfig picks the class from the saved peft_type
            method = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {method} adapter, not a Mona adapter; load "
                "it with peft.PeftConfig.from_pretrained / PeftModel.from_pretrained."
            )
        hub_kwargs = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS and v is not None}
        if subfolder is not None:
            hub_kwargs["subfolder"] = subfolder
        source = str(pretrained_model_name_or_path) + (f" (subfolder {subfolder!r})" if subfolder else "")
        check_consistent(config, read_weights(str(pretrained_model_name_or_path), **hub_kwargs), source)
        if config.modules_to_save is None:
            # A saved adapter loads as its config says: no head saved means no head, not today's default head.
            config.modules_to_save = []
        return config


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "use_auth_token")
_RETIRED_FIELDS = ("merge_filters",)
