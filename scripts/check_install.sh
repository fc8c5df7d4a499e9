#!/usr/bin/env bash
# Install check: what a user gets from `pip install mona-peft`, with nothing else around.
# Builds the wheel, installs it (not editable) into a fresh venv holding only the CPU torch and the core dependencies,
# lists what got installed, and runs there, each in a fresh interpreter:
#   1. the README's usage example (the first python block under "## Usage"), unchanged;
#   2. PeftModel.from_pretrained of a Mona adapter with no `import mona_peft` (the installed start-up hook registers
#      Mona), checked against the adapter file and the logits of the process that saved it;
#   3. `import mona_peft.training`, which must fail naming the extra to install.
#   PYTHON=python3             the interpreter the venv is made from
#   TORCH_SPEC=torch==2.13.0   installed first, so that no dependency pulls a CUDA build
#   KEEP=<dir>                 build and keep the venv in <dir> (default: a temporary folder, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
start=$(date +%s)
if [ -n "${KEEP:-}" ]; then
  work=$KEEP
  rm -rf "$work" && mkdir -p "$work"
else
  work=$(mktemp -d -t mona-install-check.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
pip_q=(-q --disable-pip-version-check)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONPATH

echo "== build the wheel"
"$PYTHON" -m pip wheel "${pip_q[@]}" --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/mona_peft-*.whl)
echo "$(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB), built after $(( $(date +%s) - start )) s"

echo "== fresh venv: $TORCH_SPEC, then the wheel with its core dependencies only"
"$PYTHON" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install "${pip_q[@]}" "$TORCH_SPEC"
"$py" -m pip install "${pip_q[@]}" "$wheel"
"$py" -m pip list --format=freeze --disable-pip-version-check | tee "$work/installed.txt"
echo "$(wc -l <"$work/installed.txt") packages, installed after $(( $(date +%s) - start )) s"
for extra in accelerate datasets evaluate pillow matplotlib onnx conformal-clip-data scipy; do
  if grep -qi "^$extra==" "$work/installed.txt"; then
    case $extra in
      accelerate) ;;  # a dependency of peft itself
      *) echo "FAIL: $extra was installed with the core package"; exit 1 ;;
    esac
  fi
done
"$py" - <<'EOF'
import importlib.metadata
import pathlib
import sysconfig

site = pathlib.Path(sysconfig.get_paths()["purelib"])
assert (site / "mona_peft-autoregister.pth").is_file(), "the start-up hook mona_peft-autoregister.pth is missing"
files = importlib.metadata.files("mona-peft")
assert not any(str(f).endswith(".egg-link") or "__editable__" in str(f) for f in files), "not a wheel install"
print(f"mona-peft {importlib.metadata.version('mona-peft')} installed from the wheel into {site}")
EOF

run_dir=$work/run
mkdir -p "$run_dir"
echo "== 1. the README usage example"
"$py" - "$repo/README.md" >"$run_dir/readme_usage.py" <<'EOF'
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
usage = text[text.index("\n## Usage\n") :]
print(re.search(r"```python\n(.*?)```", usage, flags=re.DOTALL).group(1))
EOF
cat >>"$run_dir/readme_usage.py" <<'EOF'

# --- added by scripts/check_install.sh: only core packages were imported, and a trained-looking adapter to reload
import sys

import safetensors.torch

assert isinstance(reloaded, PeftModel) and reloaded.peft_config["default"].peft_type == "MONA"
found = sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "evaluate", "matplotlib", "onnx", "PIL"})
assert not found, f"import mona_peft imported non-core packages: {found}"
torch.manual_seed(0)
ViTForImageClassification(config).save_pretrained("base")
mona_config = mona_peft.MonaConfig(bottleneck_dim=16, modules_to_save=["classifier"])
trained = get_peft_model(ViTForImageClassification.from_pretrained("base"), mona_config)
with torch.no_grad():
    for parameter in trained.parameters():
        if parameter.requires_grad:
            parameter.normal_(std=0.1)  # non-zero up-projections: Mona changes the output
trained.eval().save_pretrained("mona-trained")
pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
safetensors.torch.save_file({"pixels": pixels, "logits": trained(pixel_values=pixels).logits}, "expected.safetensors")
print("README usage example: ok")
EOF
(cd "$run_dir" && "$py" readme_usage.py)

echo "== 2. PeftModel.from_pretrained in a fresh process, without import mona_peft"
(cd "$run_dir" && "$py" - <<'EOF'
import sys

import safetensors.torch
import torch
from peft import PeftModel
from transformers import ViTForImageClassification

model = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained("base"), "mona-trained").eval()
assert "mona_peft" in sys.modules, "the start-up hook did not register Mona"
saved = safetensors.torch.load_file("mona-trained/adapter_model.safetensors")
mona = {k: v for k, v in saved.items() if ".mona_" in k}
assert mona, "no Mona weights in the saved adapter"
loaded = {n: p for n, p in model.named_parameters() if ".mona_" in n}
assert len(loaded) == len(mona), (len(loaded), len(mona))
expected = safetensors.torch.load_file("expected.safetensors")
with torch.no_grad():
    logits = model(pixel_values=expected["pixels"]).logits
torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
with model.disable_adapter(), torch.no_grad():
    assert not torch.allclose(model(pixel_values=expected["pixels"]).logits, logits), "Mona changed nothing"
print(f"from_pretrained in a fresh process: {len(mona)} Mona tensors loaded, logits match the saving process")
EOF
)

echo "== 3. import mona_peft.training without the train extra"
"$py" - <<'EOF'
try:
    import mona_peft.training  # noqa: F401
except ImportError as exc:
    assert 'pip install "mona-peft[train]"' in str(exc), exc
    print(f"ImportError as expected: {exc}")
else:
    raise AssertionError("import mona_peft.training worked without the train extra")
EOF
echo "install check passed in $(( $(date +%s) - start )) s"
