"""PEFT's own test properties, run against Mona.

PEFT ships a large generic test-suite for its methods (``tests/testing_common.py``: ``PeftCommonTester`` with its
``_test_*`` properties, driven by ``tests/test_custom_models.py``). It is not part of the installed ``peft`` wheel and
we must not vendor it, so a session fixture downloads PEFT's sdist from PyPI with pip (once, into
``$MONA_PEFT_TEST_CACHE`` or ``~/.cache/mona_peft/peft-sdist``), extracts its ``tests/`` folder and imports it as the
package ``_peft_upstream_tests``. Without PyPI the tests skip locally and fail in CI (``CI=true``).

PEFT's properties are written for LLMs and toy MLPs; this file points them at tiny ViT / Swin models built from
configs:

* ``TinyVisionModels`` plays the role of PEFT's ``MockTransformerWrapper`` (``transformers_class.from_pretrained``).
  Ids ``vit``, ``vit-backbone``, ``swin`` give real transformers models (``model(**x)[0]`` are the logits or the last
  hidden state), used for the ``PeftCommonTester._test_*`` properties.
* Ids ``vit-logits`` and ``swin-logits`` wrap a classifier in ``Logits``, a plain ``nn.Module`` that behaves like
  PEFT's custom test models (``model(**x)`` is a tensor, inputs are cast to a settable ``dtype``); they run the
  ``TestPeftCustomModel.test_*`` properties, which need exactly that.

Mona cannot be merged (it is non-linear), so every PEFT merge property is run up to its first merge call, which must
raise Mona's ``ValueError``; everything the property checked before that point (forwards, multi-adapter switching,
fp16/bf16 forwards, training) still has to pass. Properties that cannot apply are listed at the end with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import PeftModel, convert_to_lora, get_peft_model
from torch import nn

from mona_peft import MonaConfig, MonaLayer
from mona_peft.layer import MERGE_ERROR
from tiny_models import pixels, randomize_adapter, swin, vit
from tiny_vision_towers import TOWERS

# Noise from the tiny models' ids: they are no Hub repos and custom (non-transformers) models have no name_or_path.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in:UserWarning"),
]

PEFT_SDIST_VERSION = "0.21.2"
UPSTREAM_PACKAGE = "_peft_upstream_tests"
MERGE_REFUSED = re.escape(MERGE_ERROR)


# ------------------------------------------------------------------------------------------ obtaining PEFT's tests
def _cache_dir() -> Path:
    configured = os.environ.get("MONA_PEFT_TEST_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mona_peft" / "peft-sdist"


def _unavailable(reason: str) -> None:
    """Fail in CI (PEFT's tests are part of the suite there), skip on a developer machine without PyPI."""
    message = f"PEFT {PEFT_SDIST_VERSION}'s test-suite (from its PyPI sdist) is unavailable: {reason}"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _download_sdist(cache: Path) -> Path:
    archive = cache / f"peft-{PEFT_SDIST_VERSION}.tar.gz"
    if archive.is_file():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"peft=={PEFT_SDIST_VERSION}",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        "-d",
    ]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            result = subprocess.run([*command, tmp], capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(f"`pip download` could not run: {exc!r}")
        downloaded = Path(tmp) / archive.name
        if result.returncode != 0 or not downloaded.is_file():
            output = (result.stdout + result.stderr)[-800:]
            _unavailable(f"`{' '.join(command)} {tmp}` exited with {result.returncode}:\n{output}")
        os.replace(downloaded, archive)  # atomic: a concurrent session sees the whole archive or none
    return archive


def _extract_tests(archive: Path, cache: Path) -> Path:
    target = cache / f"peft-{PEFT_SDIST_VERSION}-tests"
    if (target / "testing_common.py").is_file():
        return target
    prefix = f"peft-{PEFT_SDIST_VERSION}/tests/"
    try:
        with tempfile.TemporaryDirectory(dir=cache) as tmp, tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **extra)
            extracted = Path(tmp) / prefix
            if not (extracted / "testing_common.py").is_file():
                _unavailable(f"{archive} has no {prefix}testing_common.py")
            with contextlib.suppress(OSError):  # another session may have extracted it meanwhile
                os.replace(extracted, target)
    except (OSError, tarfile.TarError) as exc:
        archive.unlink(missing_ok=True)  # a truncated download is fetched again next time
        _unavailable(f"cannot extract {archive}: {exc!r}")
    return target


@contextlib.contextmanager
def _diffusers_stub() -> Iterator[None]:
    """testing_common imports diffusers' StableDiffusionPipeline only for isinstance checks; stub it if absent."""
    if importlib.util.find_spec("diffusers") is not None:
        yield
        return
    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = stub
    try:
        yield
    finally:
        if sys.modules.get("diffusers") is stub:
            del sys.modules["diffusers"]  # keep find_spec("diffusers") honest for everybody else


def _import_upstream(tests_dir: Path) -> types.SimpleNamespace:
    package = sys.modules.get(UPSTREAM_PACKAGE)
    if package is None:
        pytest.register_assert_rewrite(UPSTREAM_PACKAGE)  # readable assertion failures inside PEFT's properties
        spec = importlib.machinery.ModuleSpec(UPSTREAM_PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(tests_dir)]
        sys.modules[UPSTREAM_PACKAGE] = package
    try:
        with _diffusers_stub():
            common = importlib.import_module(f"{UPSTREAM_PACKAGE}.testing_common")
            utils = importlib.import_module(f"{UPSTREAM_PACKAGE}.testing_utils")
            custom = importlib.import_module(f"{UPSTREAM_PACKAGE}.test_custom_models")
    except ImportError as exc:
        _unavailable(f"importing it from {tests_dir} failed: {exc!r}")
    return types.SimpleNamespace(
        PeftCommonTester=common.PeftCommonTester,
        set_init_weights_false=utils.set_init_weights_false,
        # never bound to a module-level name starting with "Test": pytest would collect all of PEFT's cases
        custom_model_tests=custom.TestPeftCustomModel,
    )


@pytest.fixture(scope="session")
def upstream() -> types.SimpleNamespace:
    """PEFT's test helpers from its sdist: PeftCommonTester, set_init_weights_false, TestPeftCustomModel."""
    cache = _cache_dir()
    return _import_upstream(_extract_tests(_download_sdist(cache), cache))


# ------------------------------------------------------------------------------------------------- tiny models
class Logits(nn.Module):
    """A classifier as PEFT's custom test models look: ``forward(**x)`` returns a tensor (the logits), inputs are cast
    to ``self.dtype`` (tests assign it, as for PEFT's ``MLP``), and ``generate`` returns the "scores" of a one-step
    generation (the logits), which is what ``_test_disable_adapter`` compares when a model can generate (PeftModel
    always has a ``generate`` that forwards to the base model's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtype = torch.float32

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values.to(self.dtype)).logits

    def generate(self, pixel_values: torch.Tensor, **kwargs: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(scores=(self(pixel_values),))


_BUILDERS = {
    "vit": vit,
    "vit-backbone": lambda: transformers.ViTModel(vit().config).eval(),
    "swin": swin,
    "clip-vision": lambda: TOWERS["clip_vision"].make(),
    "dinov3": lambda: TOWERS["dinov3"].make(),
    "siglip-vision": lambda: TOWERS["siglip_vision"].make(),
    "beit": lambda: TOWERS["beit"].make(),
    "vit-logits": lambda: Logits(vit()),
    "swin-logits": lambda: Logits(swin()),
}


class TinyVisionModels:
    """PEFT's ``MockTransformerWrapper`` for vision: ``from_pretrained(model_id)`` builds a tiny random model."""

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
        if model_id not in _BUILDERS:
            raise ValueError(f"unknown tiny model id {model_id!r}")
        torch.manual_seed(0)  # the same weights every time, as from a checkpoint
        model = _BUILDERS[model_id]().eval()
        if isinstance(model, transformers.PreTrainedModel):
            # what from_pretrained records; PEFT copies it into the adapter config and the model card
            model.config._name_or_path = model.name_or_path = model_id
        if dtype is not None:
            model = model.to(dtype)
            if isinstance(model, Logits):
                model.dtype = dtype
        return model


def _inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": pixels((32, 32), batch=2)}


class _MonaTester:
    transformers_class = TinyVisionModels
    torch_device = "cpu"  # the suite is sized and toleranced for CPU

    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        return _inputs()


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    # The tensors here are tiny: one thread is fastest, and on a busy 2-core machine OpenMP's waiting threads make
    # every LayerNorm/GELU of these models ~30x slower. Restored for the other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny models' ids ("vit", ...) are no Hub repos; without this PEFT's save_pretrained asks the Hub whether
    # "<id>/config.json" exists (see peft.utils.other.check_file_exists_on_hf_hub).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tester(upstream: types.SimpleNamespace) -> Any:
    return type("MonaPeftCommonTester", (_MonaTester, upstream.PeftCommonTester), {})()


# Adapter configs. As in PEFT's suites, the base kwargs keep the identity init and the properties that need an adapter
# that changes the output get `init_weights=False` through PEFT's own `set_init_weights_false`.
HEAD = {"bottleneck_dim": 8, "modules_to_save": ["classifier"]}
# `modules_to_save=[]`: no head, even where Mona would train the model's task head by default.
PLAIN = {"bottleneck_dim": 8, "modules_to_save": []}
HF_CASES = [
    pytest.param("vit", HEAD, id="vit"),
    pytest.param("vit-backbone", PLAIN, id="vit-backbone"),
    pytest.param("swin", HEAD, id="swin"),
    # vision towers: the bare CLIP vision model (block paths differ between the transformers lines) and DINOv3 (RoPE,
    # CLS + registers, layer scale); model(**x)[0] is the last hidden state
    pytest.param("clip-vision", PLAIN, id="clip-vision"),
    pytest.param("dinov3", PLAIN, id="dinov3"),
    # SigLIP (no CLS, attention-pooling head) and BEiT (layer scale, relative position bias, classifier head)
    pytest.param("siglip-vision", PLAIN, id="siglip-vision"),
    pytest.param("beit", HEAD, id="beit"),
]
VIT_CASES = HF_CASES[:2]
# Properties that count every non-adapter gradient as a leak, written for models without modules_to_save.
HEADLESS_CASES = [pytest.param(model_id, PLAIN, id=model_id) for model_id in ("vit", "vit-backbone")]
LOGITS_CASES = [
    pytest.param("vit-logits", HEAD, id="vit-logits"),
    pytest.param("swin-logits", PLAIN, id="swin-logits"),
]
HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def _non_identity(upstream: types.SimpleNamespace, config_kwargs: dict) -> dict:
    kwargs = upstream.set_init_weights_false(MonaConfig, config_kwargs)
    assert kwargs["init_weights"] is False  # PEFT's helper must reach Mona's flag
    return kwargs


# ------------------------------------------------------------------------------ PeftCommonTester._test_* properties
@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_model_attr(tester, model_id, config_kwargs):
    tester._test_model_attr(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_adapter_name(tester, model_id, config_kwargs):
    tester._test_adapter_name(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_pretrained(tester, upstream, model_id, config_kwargs, safe_serialization):
    kwargs = _non_identity(upstream, config_kwargs)
    tester._test_save_pretrained(model_id, MonaConfig, kwargs, safe_serialization=safe_serialization)


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_pretrained_selected_adapters(tester, upstream, model_id, config_kwargs, safe_serialization):
    kwargs = _non_identity(upstream, config_kwargs)
    tester._test_save_pretrained_selected_adapters(model_id, MonaConfig, kwargs, safe_serialization=safe_serialization)


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_save_pretrained_adapter_name_substring(tester, upstream, model_id, config_kwargs):
    tester._test_save_pretrained_adapter_name_substring(model_id, MonaConfig, _non_identity(upstream, config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_load_model_low_cpu_mem_usage(tester, model_id, config_kwargs):
    tester._test_load_model_low_cpu_mem_usage(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_from_pretrained_config_construction(tester, model_id, config_kwargs):
    tester._test_from_pretrained_config_construction(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_load_multiple_adapters(tester, model_id, config_kwargs):
    tester._test_load_multiple_adapters(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_add_adapter_no_autocast_adapter_dtype(tester, model_id, config_kwargs, dtype):
    tester._test_add_adapter_no_autocast_adapter_dtype(model_id, MonaConfig, dict(config_kwargs), dtype=dtype)


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_training(tester, model_id, config_kwargs):
    tester._test_training(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HEADLESS_CASES)
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_training_gradient_checkpointing(tester, model_id, config_kwargs, use_reentrant):
    # ViT only: the property calls `prepare_model_for_gradient_checkpointing`, i.e. transformers'
    # `enable_input_require_grads`, whose hook fails on Swin even without Mona (SwinPatchEmbeddings returns a tuple).
    # Also without modules_to_save: the property counts every gradient outside the adapter as a leak.
    tester._test_training_gradient_checkpointing(model_id, MonaConfig, dict(config_kwargs), use_reentrant)


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_inference_safetensors(tester, model_id, config_kwargs):
    tester._test_inference_safetensors(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_peft_model_device_map(tester, model_id, config_kwargs):
    tester._test_peft_model_device_map(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_delete_adapter(tester, model_id, config_kwargs):
    tester._test_delete_adapter(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_delete_inactive_adapter(tester, model_id, config_kwargs):
    tester._test_delete_inactive_adapter(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_delete_unknown_adapter_raises(tester, model_id, config_kwargs):
    tester._test_delete_unknown_adapter_raises(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_unload_adapter(tester, upstream, model_id, config_kwargs):
    tester._test_unload_adapter(model_id, MonaConfig, _non_identity(upstream, config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_get_base_model_state_dict(tester, model_id, config_kwargs):
    tester._test_get_base_model_state_dict(model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), LOGITS_CASES)
def test_disable_adapter(tester, upstream, model_id, config_kwargs):
    # Needs `Logits`: the property compares whole outputs, and takes PeftModel's `generate` path.
    tester._test_disable_adapter(model_id, MonaConfig, _non_identity(upstream, config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), HF_CASES)
def test_lora_conversion_is_declined(tester, model_id, config_kwargs):
    # PEFT's property returns early when `supports_lora_conversion()` is False, which it must be for Mona (no weight
    # delta exists); check that explicitly, and that convert_to_lora refuses instead of producing a bogus LoRA.
    tester._test_lora_conversion(model_id, MonaConfig, dict(config_kwargs))
    model = get_peft_model(TinyVisionModels.from_pretrained(model_id), MonaConfig(**config_kwargs))
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=4)


class _PixelsAsInputIds(_MonaTester):
    # `_test_prepare_for_training` feeds `inputs["input_ids"]` to `model.get_input_embeddings()`; for ViT that is the
    # patch embedding, which takes pixels.
    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        return {"input_ids": pixels((32, 32), batch=2)}


@pytest.mark.parametrize(("model_id", "config_kwargs"), VIT_CASES)
def test_prepare_for_training(upstream, model_id, config_kwargs):
    # ViT only: Swin's `get_input_embeddings()` returns (embeddings, grid), which the property cannot use.
    tester = type("MonaPixelsTester", (_PixelsAsInputIds, upstream.PeftCommonTester), {})()
    tester._test_prepare_for_training(model_id, MonaConfig, dict(config_kwargs))


# Merging: each property runs up to its first merge call, which must be refused with Mona's explanation.
@pytest.mark.parametrize(("model_id", "config_kwargs"), [HF_CASES[0], HF_CASES[2]])
@pytest.mark.parametrize(
    "prop",
    [
        "_test_merge_layers",
        "_test_merge_layers_fp16",
        "_test_merge_layers_nan",
        "_test_merge_layers_multi",
        "_test_merge_layers_is_idempotent",
        "_test_safe_merge",
    ],
)
def test_merge_properties_are_refused(tester, upstream, prop, model_id, config_kwargs):
    with pytest.raises(ValueError, match=MERGE_REFUSED):
        getattr(tester, prop)(model_id, MonaConfig, _non_identity(upstream, config_kwargs))


# ----------------------------------------------------------------------- TestPeftCustomModel.test_* properties
# PEFT's custom-model tests are methods of TestPeftCustomModel whose only fixtures are `self.transformers_class`,
# `self.prepare_inputs_for_testing` and `self.torch_device`; they are called here with the Mona tester as `self`.
def _custom(upstream, name: str):
    return getattr(upstream.custom_model_tests, name)


@pytest.mark.parametrize(("model_id", "config_kwargs"), LOGITS_CASES)
@pytest.mark.parametrize(
    "name",
    [
        "test_save_load_roundtrip_direct_injection",
        "test_in_features_out_features_exposed",
        "test_forward_output_finite",
        "test_parameters_after_loading_model",
        "test_disable_adapters",
        "test_active_adapter",  # skips itself for the case with modules_to_save, as in PEFT
        "test_disable_adapters_exiting_context_restores_previous_state",
        "test_disable_adapter_is_reentrant",
        "test_disable_adapters_exiting_context_irregular_state",
        "test_delete_adapter_properly_cleans_up_after_itself",
    ],
)
def test_custom_model_property(tester, upstream, name, model_id, config_kwargs):
    _custom(upstream, name)(tester, model_id, model_id, MonaConfig, dict(config_kwargs))


@pytest.mark.parametrize(("model_id", "config_kwargs"), LOGITS_CASES)
def test_save_load_roundtrip(tester, upstream, model_id, config_kwargs, tmp_path):
    roundtrip = _custom(upstream, "test_save_load_roundtrip")
    roundtrip(tester, model_id, model_id, MonaConfig, dict(config_kwargs), tmp_path)


@pytest.mark.parametrize(("model_id", "config_kwargs"), LOGITS_CASES)
@pytest.mark.parametrize(
    "name",
    [
        "test_forward_float16",
        "test_forward_bfloat16",
        "test_forward_float16_no_autocast",
        "test_forward_bfloat16_no_autocast",
    ],
)
def test_half_precision_forward_then_merge_is_refused(tester, upstream, name, model_id, config_kwargs):
    # the fp16/bf16 forwards must work; the merge_adapter() that follows must be refused
    with pytest.raises(ValueError, match=MERGE_REFUSED):
        _custom(upstream, name)(tester, model_id, model_id, MonaConfig, dict(config_kwargs))


# All 12 combinations on ViT; on Swin the half-precision ones with low_cpu_mem_usage (the path most likely to differ).
DTYPE_AUTOCAST_CASES = [
    pytest.param(*case.values, dtype, autocast, low_cpu_mem, id=f"{case.id}-{dtype_id}-{autocast}-{low_cpu_mem}")
    for case in LOGITS_CASES
    for dtype, dtype_id in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32"))
    for autocast in ("autocast", "no-autocast")
    for low_cpu_mem in ("eager", "low-cpu-mem")
    if case.id == "vit-logits" or (dtype != torch.float32 and low_cpu_mem == "low-cpu-mem")
]


@pytest.mark.parametrize(("model_id", "config_kwargs", "dtype", "autocast", "low_cpu_mem"), DTYPE_AUTOCAST_CASES)
def test_adapter_dtype_autocast(tester, upstream, model_id, config_kwargs, dtype, autocast, low_cpu_mem, tmp_path):
    _custom(upstream, "test_adapter_dtype_autocast")(
        tester,
        model_id,
        model_id,
        MonaConfig,
        dict(config_kwargs),
        dtype,
        autocast == "autocast",
        low_cpu_mem == "low-cpu-mem",
        tmp_path,
    )


# --------------------------------------------------------------------------------------------- restated properties
def _block_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ in {"ViTLayer", "SwinLayer"}]


@pytest.mark.parametrize(("model_id", "config_kwargs"), [HF_CASES[0], HF_CASES[2]])
def test_training_layer_indexing(model_id, config_kwargs, tmp_path):
    # Restates `_test_training_layer_indexing`: PEFT's version passes `layers_to_transform=[0]`, a LoRA-family option
    # that MonaConfig does not have (the property then skips itself); Mona selects blocks with `target_modules`.
    base = TinyVisionModels.from_pretrained(model_id)
    first_block = _block_names(base)[0]
    model = get_peft_model(base, MonaConfig(**{**config_kwargs, "target_modules": [first_block]}))
    inputs = _inputs()
    model(**inputs)[0].sum().backward()
    adapted = [name for name, module in model.named_modules() if isinstance(module, MonaLayer)]
    assert adapted == [f"base_model.model.{first_block}"]
    n_trainable = 0
    for name, param in model.named_parameters():
        if model.prefix in name:
            assert f".{first_block}." in name and param.grad is not None
            n_trainable += 1
        elif "modules_to_save" not in name:
            assert param.grad is None, name

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TinyVisionModels.from_pretrained(model_id), tmp_path)
    torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0], atol=1e-4, rtol=1e-4)

    every_block = get_peft_model(TinyVisionModels.from_pretrained(model_id), MonaConfig(**config_kwargs))
    assert n_trainable < sum(model.prefix in name for name, _ in every_block.named_parameters())


@pytest.mark.parametrize(
    ("model_id", "config_kwargs", "loss"),
    [
        pytest.param(
            "swin", HEAD, lambda out: nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])), id="swin"
        ),
        pytest.param("vit-backbone", PLAIN, lambda out: out.last_hidden_state.square().mean(), id="vit-backbone"),
    ],
)
def test_only_params_are_updated(model_id, config_kwargs, loss):
    # Restates TestPeftCustomModel.test_only_params_are_updated: after a few optimizer steps *every* trainable adapter
    # (and head) parameter has changed and nothing else has. PEFT's version (3 SGD steps, lr 0.5, loss = output.sum(),
    # identity init) cannot hold for Mona as designed: the official init scales the LayerNorm branch by s1 = 1e-6, so
    # its LayerNorm gets ~1e-6 gradients, and a tiny model's summed logits give tiny gradients anyway. Here the adapter
    # is randomised (live s1), the loss is a real one and Adam moves every parameter whose gradient is non-zero. Models
    # whose output depends on every token: with a CLS-pooled ViT *classifier*, the last block's depthwise filters get
    # exactly zero gradient (prefix tokens skip the filter, and nothing mixes tokens after the last block).
    model = get_peft_model(TinyVisionModels.from_pretrained(model_id), MonaConfig(**config_kwargs))
    randomize_adapter(model)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss(model(**_inputs())).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        trainable = model.prefix in name or "modules_to_save" in name
        assert param.requires_grad == trainable, name
        if trainable:
            assert not torch.allclose(param, before[name], atol=1e-4, rtol=1e-4), name
        else:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("model_id", ["vit", "swin"])
def test_deepcopy(model_id):
    # PEFT's properties (merge_layers_multi, only_params_are_updated, merging in train mode) deep-copy PEFT models, as
    # users do for EMA/teacher copies; the copy must be independent and compute the same outputs.
    config = MonaConfig(bottleneck_dim=8, init_weights=False)
    model = get_peft_model(TinyVisionModels.from_pretrained(model_id), config).eval()
    copied = copy.deepcopy(model)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs)[0], model(**inputs)[0], atol=0, rtol=0)
        copied.unload()
        assert any(isinstance(m, MonaLayer) for m in model.modules())
        assert not torch.equal(model(**inputs)[0], copied.base_model.model(**inputs)[0])


def test_set_requires_grad():
    # Restates TestPeftCustomModel.test_set_requires_grad, which hard-codes an MLP with Linear targets.
    base = TinyVisionModels.from_pretrained("vit")
    blocks = _block_names(base)
    model = get_peft_model(base, MonaConfig(bottleneck_dim=8), "adapter0")
    model.add_adapter("adapter1", MonaConfig(bottleneck_dim=4, target_modules=blocks[:1]))

    def grads(adapter: str) -> set[bool]:
        return {p.requires_grad for n, p in model.named_parameters() if f".{adapter}." in n and model.prefix in n}

    assert grads("adapter0") == {True} and grads("adapter1") == {False}
    model.set_requires_grad(adapter_names="adapter1")
    assert grads("adapter0") == {True} and grads("adapter1") == {True}
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    assert grads("adapter0") == {False} and grads("adapter1") == {False}


# Restated above (PEFT's version cannot run as written): `_test_training_layer_indexing` (no `layers_to_transform`),
# `test_only_params_are_updated` (Mona's s1 = 1e-6 init and CLS pooling, see there), `test_set_requires_grad`
# (hard-coded MLP). Run on ViT only: `_test_training_gradient_checkpointing` and `_test_prepare_for_training` (Swin's
# patch embedding returns a tuple, which transformers' `enable_input_require_grads` hook cannot handle).
#
# Not run, with the reason:
# - `_test_passing_input_embeds_works`, `_test_generate*`, `_test_generate_with_mixed_adapter_batches_and_beam_search`,
#   `_test_training_prompt_learning_tasks`: LLM / prompt-learning only (input_ids, inputs_embeds, generate).
# - `_test_mixed_adapter_batches`: PEFT runs it only for LoRA and RoAD; Mona has no per-sample `adapter_names`.
# - `_test_weighted_combination_of_adapters` (+ `_lora`/`_ia3`): `add_weighted_adapter` exists for LoRA/IA3 only.
# - `_test_adding_multiple_adapters_with_bias_raises`, `test_disable_adapter_with_bias_warns`: MonaConfig has no
#   `bias` option.
# - `test_merge_layers_is_deterministic_in_train_mode`, `test_delete_merged_adapter_*`: need a successful merge; the
#   refusal itself is checked by `test_merge_properties_are_refused`. `test_disable_adapters_with_merging`: before its
#   merge it is `test_disable_adapters` (run above), after it needs a successful merge.
# - The config-class-parametrised TestPeftCustomModel tests (modules_to_save overlaps, trainable tokens, embedding
#   resizing, model cards of toy MLPs, DoRA/GPT-2/MHA specifics) hard-code Linear-target MLPs or LoRA features.
