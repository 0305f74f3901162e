#!/usr/bin/env bash
# Set up ./.venv and run the test suite (CPU; no GPU, no ComfyUI needed).
# Extra arguments go to pytest. Host tests run too when COMFYUI_PATH points at a ComfyUI
# checkout whose requirements are installed in this environment; otherwise they skip, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# torch is taken as found; a fresh venv gets the CPU build (override with TORCH_SPEC).
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VPY" -m pip install -q -e ".[test]"
# FlashInfer's CPU-side functions (row shuffle, mm_fp4 problem-size checks) cross-check our
# Blackwell layouts; its GPU kernels are never needed here.
"$VPY" -c "import flashinfer" 2>/dev/null || "$VPY" -m pip install -q "flashinfer-python==0.7.2.post1"
set +e
"$VPY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$rc"
