"""A backend's Triton kernels compiled in the background, before and while preparation runs.

On a machine whose Triton cache is empty, preparing a model used to wait for every kernel variant
before its first layer (2-3 s of compiling, then 2-3 s of preparing). Here each layer shape's
variants (the backend's `preparation_launches`, built on meta tensors, so the same variants as the
real calls) are compiled by a thread pool through Triton's AsyncCompileMode. One finishing task
per shape loads its kernels into the GPU with their C launchers (otherwise each variant's first
launch builds and loads them, one at a time).

What is compiled is remembered for the process, per (backend, device, layer shape), so the
loader can start it as it reads a checkpoint (preparation.start_compiling) and preparation later
finds the shapes ready, or in flight, and waits per layer only for its own shape. Preparation
takes the layers in the order their shapes were queued, so preparing the first shapes' layers
overlaps compiling the rest.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import triton

from .registry import KernelsAhead
from .triton_common import LayerShape

COMPILE_WORKERS = max(1, min(8, os.cpu_count() or 1))  # measured: more than 8 stopped paying


class _Compiler:
    """Process-wide: the thread pools, one AsyncCompileMode for every request (so a variant that
    several shapes or requests share compiles once), and each (backend, device, shape)'s future."""

    def __init__(self):
        self._lock = threading.RLock()  # a done-callback may run inline while start() holds it
        self._pools = None
        self._context = None  # a private context in which the async mode stays entered
        self._async = False
        self._ready: dict[tuple, Future] = {}
        self.done_at: dict[tuple, float] = {}

    def start(self, backend: str, shapes, launches_of, device: torch.device) -> tuple[dict, int]:
        """({shape: future of its kernels being ready}, launches newly queued) for these shapes,
        queuing those not yet asked for, in order."""
        with self._lock:
            keys = {s: _key(backend, device, s) for s in shapes}
            new = [s for s in shapes if keys[s] not in self._ready]
            per_shape = {s: launches_of(s) for s in new}
            if new:
                finish_pool = self._started()
                getters = self._context.run(self._submit, per_shape, device, self._async)
                for s in new:
                    future = finish_pool.submit(self._finish, keys[s], getters[s], device)
                    future.add_done_callback(lambda f, key=keys[s]: self._drop_if_failed(key, f))
                    self._ready[keys[s]] = future
            return {s: self._ready[keys[s]] for s in shapes}, sum(map(len, per_shape.values()))

    def _started(self) -> ThreadPoolExecutor:
        """The finishing pool, the compile pool and the async mode started if they were not."""
        if self._pools is None:
            self._pools = (ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="nvfp4-compile"),
                           ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="nvfp4-load"))
        if self._context is None:
            self._context = contextvars.copy_context()
            async_mode = getattr(triton, "AsyncCompileMode", None)  # Triton 3.4+
            self._async = async_mode is not None
            if self._async:
                # never left: leaving waits for every compile; the caller's context is untouched
                self._context.run(async_mode(self._pools[0]).__enter__)
        return self._pools[1]

    @staticmethod
    def _submit(per_shape: dict, device: torch.device, use_async: bool) -> dict:
        """Each launch -> a function returning its compiled kernel. In async mode (Triton 3.4+)
        the compiles are queued on the pool now, first shape first; without it each shape's
        finishing task compiles its own."""
        if not use_async:
            return {s: [lambda lc=lc: _warm(lc) for lc in launches] for s, launches in per_shape.items()}
        with _on(device):
            return {s: [_getter(_warm(lc)) for lc in launches] for s, launches in per_shape.items()}

    def _finish(self, key, getters, device: torch.device) -> None:
        with _on(device):
            for kernel in [get() for get in getters]:
                if kernel is not None:  # None: a jit_cache_hook skipped it
                    _load(kernel)
        self.done_at[key] = time.perf_counter()

    def _drop_if_failed(self, key, future: Future) -> None:
        """A shape whose compile failed is asked for anew next time (and fails there, named)."""
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._ready.get(key) is future:
                    del self._ready[key]
                self._context = None  # and a fresh async mode, which has not kept the failed variant

    def forget(self) -> None:
        """Forget what was compiled (tests that empty Triton's in-memory kernel caches call this
        too, so the next request compiles again)."""
        with self._lock:
            self._ready.clear()
            self.done_at.clear()
            self._context = None  # a fresh async mode: its per-variant futures are gone too


_COMPILER = _Compiler()
forget = _COMPILER.forget


class TritonKernelsAhead(KernelsAhead):
    """Starts (or joins) compiling `launches_of(shape)` for the LayerShape of each of `layers`
    (modules or checkpoint layers) that `needs` it, in the layers' order."""

    covers = True  # tests/gpu: preparation compiles nothing else

    def __init__(self, backend: str, layers, launches_of, device: torch.device, needs=lambda shape: True):
        self._start = time.perf_counter()
        self._needs = needs
        shapes = list(dict.fromkeys(s for s in map(self._shape, layers) if s is not None))
        self._rank = {s: i for i, s in enumerate(shapes)}
        self._keys = [_key(backend, device, s) for s in shapes]
        self._ready, self.launches = _COMPILER.start(backend, shapes, launches_of, device)

    def _shape(self, layer):
        shape = LayerShape.of(layer)
        return shape if self._needs(shape) else None

    def order(self, module) -> int:
        return self._rank.get(self._shape(module), len(self._rank))

    def wait(self, module) -> None:
        ready = self._ready.get(self._shape(module))
        if ready is not None:
            ready.result()

    def close(self, cancel: bool = False) -> float:
        """cancel: return at once; what is compiling goes on in the background (the next request
        finds it)."""
        if cancel:
            return 0.0
        for ready in self._ready.values():
            ready.result()
        return max([_COMPILER.done_at.get(k, self._start) - self._start for k in self._keys] + [0.0])


def _key(backend: str, device: torch.device, shape) -> tuple:
    """What a request is remembered by: "cuda" and "cuda:<current>" are one device."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return backend, device, shape


def _warm(launch):
    """Compile the launch's variant without running it (Triton's warmup: the compiled kernel, or
    a FutureKernel under an AsyncCompileMode)."""
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)


def _on(device: torch.device):
    """The device current for Triton while compiling and loading for it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _getter(compiled):
    """warmup's answer in async mode -> a function returning the compiled kernel: a FutureKernel's
    result() (which also enters it in the kernel's cache), or the kernel itself when it was
    cached. Shapes sharing a variant share its FutureKernel, whose result() is not safe to enter
    from two threads at once (Triton 3.9 drops its future on the way out)."""
    if not hasattr(type(compiled), "result"):
        return lambda: compiled
    lock = _lock_for(compiled)

    def get():
        with lock:
            return compiled.result()
    return get


def _load(kernel) -> None:
    """Load a compiled kernel and build its launcher now, through Triton's own lazy loader
    `_init_handles` (3.x; without it the first launch loads). Once per variant: _init_handles
    sets the launcher before the module, so a second thread must not enter it halfway."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        with _lock_for(kernel):
            init()


_LOCKS_LOCK = threading.Lock()
_LOCKS: dict[int, threading.Lock] = {}  # per object (a variant's FutureKernel or compiled kernel)


def _lock_for(obj) -> threading.Lock:
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(id(obj), threading.Lock())
