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

STAGING_BYTES = 160 << 20  # above FLUX.1's largest layer tensor (fp8 21504 x 3072 = 63 MiB)


class Staging:
    """One pinned buffer per thread, for one preparation pass. A tensor larger than the buffer
    (FLUX.2's widest layers: 340 MB at fp8) goes through it in chunks, its two halves taking
    turns so that one half's CPU copy overlaps the other's DMA."""

    def __init__(self, nbytes: int = STAGING_BYTES):
        self.nbytes = nbytes
        self._local = threading.local()

    def _buffer(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def _fits(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.numel() * t.element_size() > self.nbytes:
            return None
        return self._buffer()[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    def _halves(self, t: torch.Tensor):
        """(the buffer's two halves as flat views of t's dtype, elements per chunk), or None where
        t cannot be cut into flat chunks (not contiguous) or the halves hold no element."""
        step = self.nbytes // 2 // t.element_size()
        if not t.is_contiguous() or step == 0:
            return None
        buf = self._buffer()
        half = step * t.element_size()
        return [buf[i * half:(i + 1) * half].view(t.dtype) for i in (0, 1)], step

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device.type != "cpu" or t.is_pinned():
            return t.to(device)
        view = self._fits(t)
        if view is not None:
            view.copy_(t)                       # CPU copy into pinned memory
            out = torch.empty(t.shape, dtype=t.dtype, device=device)
            out.copy_(view, non_blocking=True)  # one DMA
            torch.cuda.current_stream(device).synchronize()  # the buffer is reused by the next copy
            return out
        cut = self._halves(t)
        if cut is None:
            return t.to(device)
        halves, step = cut
        src, out = t.reshape(-1), torch.empty(t.shape, dtype=t.dtype, device=device)
        dst, stream = out.view(-1), torch.cuda.current_stream(device)
        done = [None, None]  # per half: the event of its last DMA
        for i, lo in enumerate(range(0, src.numel(), step)):
            n, k = min(step, src.numel() - lo), i % 2
            if done[k] is not None:
                done[k].synchronize()           # that half's previous DMA has read it
            halves[k][:n].copy_(src[lo:lo + n])
            dst[lo:lo + n].copy_(halves[k][:n], non_blocking=True)
            done[k] = stream.record_event()
        stream.synchronize()
        return out

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        view = self._fits(t)
        if view is not None:
            view.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            out = torch.empty(t.shape, dtype=t.dtype)
            out.copy_(view)                     # CPU copy into ordinary memory
            return out
        cut = self._halves(t)
        if cut is None:
            return t.to("cpu")
        halves, step = cut
        src, out = t.reshape(-1), torch.empty(t.shape, dtype=t.dtype)
        dst, stream = out.view(-1), torch.cuda.current_stream(t.device)
        pending = None  # (half, start, count, event) of the chunk whose DMA is in flight
        for i, lo in enumerate(range(0, src.numel(), step)):
            n, k = min(step, src.numel() - lo), i % 2
            halves[k][:n].copy_(src[lo:lo + n], non_blocking=True)  # this half was emptied below
            event = stream.record_event()
            if pending is not None:             # the previous chunk's CPU copy overlaps this DMA
                pk, plo, pn, pev = pending
                pev.synchronize()
                dst[plo:plo + pn].copy_(halves[pk][:pn])
            pending = (k, lo, n, event)
        if pending is not None:
            pk, plo, pn, pev = pending
            pev.synchronize()
            dst[plo:plo + pn].copy_(halves[pk][:pn])
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
