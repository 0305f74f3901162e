"""NVFP4_GEMM_BACKEND: force a backend for every NVFP4 layer, whatever the node says (the way
sglang's FlashInfer FP4 backend variable works). Case-insensitive; flashinfer_* aliases accepted;
an unknown value warns once and is ignored. Changing it clears cached auto decisions."""
from __future__ import annotations

import logging
import os

ENV_VAR = "NVFP4_GEMM_BACKEND"
ALIASES = {"flashinfer_cudnn": "cudnn", "flashinfer_cutlass": "cutlass", "flashinfer_trtllm": "trtllm"}
log = logging.getLogger("comfyui_nvfp4")
_warned: set[str] = set()
_last_seen: list[str | None] = [None]
_listeners = []


def on_change(fn) -> None:
    """fn() is called when the variable's value differs from the last one read."""
    _listeners.append(fn)


def read(known: list[str]) -> str | None:
    """The override in force (a backend name or 'auto'), or None."""
    raw = os.environ.get(ENV_VAR)
    if raw != _last_seen[0]:
        _last_seen[0] = raw
        for fn in _listeners:
            fn()
    if raw is None or not raw.strip():
        return None
    v = raw.strip().lower()
    v = ALIASES.get(v, v)
    if v == "auto" or v in known:
        return v
    if raw not in _warned:
        _warned.add(raw)
        log.warning("%s=%r is not a known backend (known: auto, %s, or flashinfer_cudnn/cutlass/trtllm); "
                    "ignoring it", ENV_VAR, raw, ", ".join(known))
    return None
