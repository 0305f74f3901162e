"""Host <-> device copies of weight preparation through a pinned staging buffer per thread.

The CUDA driver's own path for pageable (ordinary) host memory moved the FP8 weights of a 12B
model at ~1.7 GB/s on the H100 host (13.5 s for 17.5 GB both ways). A pinned buffer turns each
copy into one DMA at PCIe speed plus a CPU copy between the buffer and the pageable tensor.
Inside `staging()` (one preparation pass) `to_device` / `to_host` take that route; elsewhere
they are plain `.to()` copies.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import torch

STAGING_BYTES = 160 << 20  # above the largest FLUX layer tensor (fp8 21504 x 3072 = 63 MiB)


class Staging:
    """One pinned buffer per thread, for one preparation pass."""

    def __init__(self, nbytes: int = STAGING_BYTES):
        self.nbytes = nbytes
        self._local = threading.local()

    def _fits(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.numel() * t.element_size() > self.nbytes:
            return None
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        view = self._fits(t) if t.device.type == "cpu" and not t.is_pinned() else None
        if view is None:
            return t.to(device)
        view.copy_(t)                       # CPU copy into pinned memory
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        out.copy_(view, non_blocking=True)  # one DMA
        torch.cuda.current_stream(device).synchronize()  # the buffer is reused by the next copy
        return out

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        view = self._fits(t)
        if view is None:
            return t.to("cpu")
        view.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        out = torch.empty(t.shape, dtype=t.dtype)
        out.copy_(view)                     # CPU copy into ordinary memory
        return out


_current: contextvars.ContextVar[Staging | None] = contextvars.ContextVar("nvfp4_staging", default=None)


@contextlib.contextmanager
def staging(nbytes: int = STAGING_BYTES):
    """Stage copies (CUDA only) until exit, through pinned buffers of `nbytes` (at most
    STAGING_BYTES; preparation asks for what its largest copy needs: pinning memory holds the
    GIL, about 140 ms per 160 MiB buffer on the H200 host); they are released afterwards."""
    if not torch.cuda.is_available():
        yield None
        return
    token = _current.set(Staging(min(nbytes, STAGING_BYTES)))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
        empty = getattr(torch._C, "_host_emptyCache", None)  # hand the pinned pages back
        if empty is not None:
            empty()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    s = _current.get()
    if t.device == device or s is None or device.type != "cuda":
        return t.to(device)
    return s.to_device(t, device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    s = _current.get()
    if s is None or t.device.type != "cuda":
        return t.to("cpu")
    return s.to_host(t)
