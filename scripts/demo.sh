#!/usr/bin/env bash
# The main job: with COMFYUI_PATH set, run a generated NVFP4 FLUX model through a real headless
# ComfyUI (using COMFYUI_PYTHON, the python that has ComfyUI's requirements); without it, set up
# ./.venv and run the nvfp4 tool on a generated checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${COMFYUI_PATH:-}" ]; then
  exec "${COMFYUI_PYTHON:-python3}" scripts/demo.py --comfyui "$COMFYUI_PATH" "$@"
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VPY" -m pip install -q -e .
exec "$VPY" scripts/demo.py "$@"
