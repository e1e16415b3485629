#!/usr/bin/env bash
# Set up .venv for maas-ray: torch (the [train] extra) and exactly one onnxruntime build, chosen by hardware.
#   GPU machine (nvidia-smi lists a GPU): torch from PyPI (CUDA build) + maas-ray[gpu] (onnxruntime-gpu)
#   CPU machine: the CPU build of torch (never the multi-GB CUDA wheels) + maas-ray[cpu] (onnxruntime)
# Set MAAS_TORCH_INDEX=https://download.pytorch.org/whl/cpu where no CPU torch wheel is
# available locally; set MAAS_FLAVOR=cpu|gpu to override the detection.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup: no python3 found; install Python 3.10-3.12" >&2
  exit 1
fi

flavor="${MAAS_FLAVOR:-}"
if [ -z "$flavor" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then flavor=gpu; else flavor=cpu; fi
fi
echo "setup: $($PY --version) in .venv, flavor=$flavor"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
torch_args=("torch==2.13.0")
if [ "$flavor" = cpu ] && [ -n "${MAAS_TORCH_INDEX:-}" ]; then
  torch_args+=(--index-url "$MAAS_TORCH_INDEX")
fi
"${pip[@]}" "${torch_args[@]}"
# The other build must not linger: both own the same `onnxruntime/` files.
other=$([ "$flavor" = gpu ] && echo onnxruntime || echo onnxruntime-gpu)
.venv/bin/python -m pip uninstall --quiet -y "$other" >/dev/null 2>&1 || true
"${pip[@]}" -e ".[$flavor,train,tabular,dev]"
.venv/bin/python -c "
from maas_ray.runtime import check_onnxruntime_install
import torch
print('setup: ok:', check_onnxruntime_install(), '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
