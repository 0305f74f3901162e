"""GEMM backends behind one registry (capability, prepare, run). Pure torch at import time:
FlashInfer and Triton are imported only by the backends that need them, when they run."""
from . import blackwell, hopper, portable  # noqa: F401  (register the backends)
from .module import ACTIVE_BACKEND, NVFP4LinearModule
from .registry import AUTO, BackendUnavailableError, availability, describe_device, get, names, resolve

__all__ = ["ACTIVE_BACKEND", "AUTO", "BackendUnavailableError", "NVFP4LinearModule", "availability",
           "describe_device", "get", "names", "resolve"]
