"""Preparing layers for a backend, and the self-check that catches silent wrong layouts.

A backend's `prepare` may compute on the GPU; the layer's prepared tensors are checked where
they were made and then stored next to the layer's other parameters (the CPU originals for a
model ComfyUI has offloaded), so each weight crosses the bus once each way.

Every prepared layer runs once on a small random input against the dequant reference of a
sample of its output channels; a cosine similarity under SELF_CHECK_MIN_COSINE refuses the
preparation with an error naming the layer and the backend (the class of all-zeros and noise
bugs peers shipped). Set NVFP4_SELF_CHECK=0 to skip it; its cost is reported either way.
"""
from __future__ import annotations

import contextvars
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from ..quant.nvfp4 import NVFP4Weight
from . import registry, transfer
from .tuning import untuned

SELF_CHECK_MIN_COSINE = 0.95
SELF_CHECK_ROWS = 32  # > 16: the paths image tokens take (small-M kernels share the layouts)
PREP_WORKERS = 4  # layers prepared at once (their host<->device copies overlap)
SELF_CHECK_CHANNELS = 96  # output channels compared (spread over N, every part included)


class SelfCheckError(RuntimeError):
    pass


def self_check_enabled() -> bool:
    return os.environ.get("NVFP4_SELF_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def sampled_channels(n: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(n, SELF_CHECK_CHANNELS)).round().long().unique()


def reference_channels(module, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x @ dequant(W[channels]).T + bias[channels], reading only those rows of the stored weights."""
    ws, start = [], 0
    for p in module.stored_parts():
        n = p.packed.shape[0]
        sel = channels[(channels >= start) & (channels < start + n)] - start
        if len(sel):
            rows = NVFP4Weight(p.packed[sel], p.block_scale[sel], p.global_scale, p.input_scale)
            ws.append(rows.dequantize(x.dtype, x.device))
        start += n
    b = module._parameters.get("bias")
    b = None if b is None else b[channels.to(b.device)].to(x.device, x.dtype)
    return torch.nn.functional.linear(x, torch.cat(ws), b)


def check_layer(module, backend: registry.Backend, device: torch.device, dtype=torch.bfloat16) -> float:
    """Cosine similarity of the backend's output and dequant's (on sampled channels) for one
    random input, at SELF_CHECK_ROWS rows and at one row (backends run small M on other kernels:
    both must be right); the worse of the two."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.randn(SELF_CHECK_ROWS, module.in_features, generator=g).to(device=device, dtype=dtype)
    channels = sampled_channels(module.out_features)
    ref = reference_channels(module, x, channels).float()
    path = module.last_path
    worst = 1.0
    try:
        with untuned():  # checks the layout; kernel configs are timed on the shapes sampling runs
            for rows in (SELF_CHECK_ROWS, 1):
                y = backend.run(module, x[:rows])[:, channels.to(device)].float()
                if not torch.isfinite(y).all():
                    return float("nan")
                cos = torch.nn.functional.cosine_similarity(y.flatten(), ref[:rows].flatten(), dim=0)
                worst = min(worst, float(cos))
    finally:
        module.last_path = path
    return worst


def _prepare_one(m, backend, device, self_check: bool) -> tuple[float | None, float]:
    """Make, check and store one layer's layout: (self-check cosine or None, seconds checking)."""
    home = m.home_device()
    tensors = backend.prepare(m)
    m.set_prepared(backend.name, tensors)
    cos, spent = None, 0.0
    if self_check:
        t1 = time.perf_counter()
        cos = check_layer(m, backend, device)
        spent = time.perf_counter() - t1
        if not cos >= SELF_CHECK_MIN_COSINE:
            m.drop_prepared()
            raise SelfCheckError(
                f"NVFP4 self-check failed: layer {m.layer_name} on backend '{backend.name}' gives "
                f"cosine {cos:.4f} against the dequantized reference (need >= {SELF_CHECK_MIN_COSINE}). "
                f"Its weights would produce a wrong image; pick another backend, and please report this "
                f"with the GPU, driver and FlashInfer versions.")
    m.move_prepared(backend.name, home)
    if tensors:  # a layer the backend runs another way (e.g. w4a16 with K % 128 != 0) keeps its originals
        m.park(backend.replaces)
    return cos, spent


def start_compiling(layers, device: torch.device, backends=None) -> list:
    """Start compiling in the background the kernels that preparing `layers` (modules, or the
    checkpoint layers the loader reads) on `device` will run, for each of `backends` (default:
    those `auto` may pick there). The loader calls it as it reads each layer, so the compiles
    overlap reading the checkpoint and preparation finds them done. Nothing waits here; returns
    the backends' KernelsAhead."""
    if backends is None:
        from .autotune import auto_candidates
        backends = auto_candidates(device)
    return [b.compile_ahead(layers, device) for b in backends if b.prepares]


_streams = threading.local()


def _in_own_stream(fn, device: torch.device):
    """Run fn on this thread's CUDA stream, so several layers' copies and kernels overlap."""
    if device.type != "cuda":
        return fn()
    if getattr(_streams, "stream", None) is None:
        _streams.stream = torch.cuda.Stream(device)
    with torch.cuda.stream(_streams.stream):
        out = fn()
        _streams.stream.synchronize()
    return out


def prepare_modules(modules, backend, device: torch.device, *, self_check: bool | None = None,
                    progress=None, workers: int = PREP_WORKERS) -> dict:
    """Prepare every NVFP4 module for its backend (once) and drop other backends' layouts.

    `backend` is a Backend, or a function module -> Backend (per-layer choices of `auto`).
    Each backend starts compiling the kernels its layers will run, several at once in the
    background (Backend.compile_ahead; info["compile_seconds"]: its wall time), and each layer
    waits only for its own shape's kernels, taken in the order they were queued (the loader may
    have started them: start_compiling). Layers run `workers` at a time, each thread on its own
    CUDA stream: the host<->device copies (most of the time for a model offloaded to the CPU) of
    several layers then overlap. Where a backend's kernels are not all compiled ahead, its first
    layer runs alone first and compiles them."""
    choose = backend if callable(backend) and not isinstance(backend, registry.Backend) else (lambda m: backend)
    self_check = self_check_enabled() if self_check is None else self_check
    info = {"prepared_layers": 0, "freed_bytes": 0, "seconds": 0.0, "self_check_seconds": 0.0,
            "self_check_min_cosine": None, "compile_seconds": 0.0, "compile_launches": 0}
    t0 = time.perf_counter()
    todo = [m for m in modules if m.format == "nvfp4"]
    jobs = []
    for m in todo:
        b = choose(m)
        info["freed_bytes"] += m.drop_prepared(keep=b.name)
        if b.prepares and b.name not in m.prepared_backends():
            jobs.append((m, b))
    done = len(todo) - len(jobs)

    def finished(result):
        nonlocal done
        cos, spent = result
        info["prepared_layers"] += 1
        info["self_check_seconds"] += spent
        if cos is not None:
            worst = info["self_check_min_cosine"]
            info["self_check_min_cosine"] = cos if worst is None else min(worst, cos)
        done += 1
        if progress:
            progress(done, len(todo))

    if progress and done:
        progress(done, len(todo))
    if any(not b.parallel_prepare for _, b in jobs):
        workers = 1
    # each backend's kernels start compiling in the background; a layer waits for its own
    ahead = {b.name: b.compile_ahead([m for m, mb in jobs if mb is b], device)
             for b in {id(b): b for _, b in jobs}.values()}
    info["compile_launches"] = sum(a.launches for a in ahead.values())
    jobs.sort(key=lambda j: ahead[j[1].name].order(j[0]))  # stable: model order within a shape
    try:
        # the largest copy: a layer's whole weight at one byte per element (fp8's layout; NVFP4
        # codes and w4a16's are half that)
        with transfer.staging(max((m.in_features * m.out_features for m, _ in jobs), default=0)):
            _run_jobs(jobs, device, self_check, workers, finished, ahead)
    except BaseException:
        for a in ahead.values():
            a.close(cancel=True)
        raise
    info["compile_seconds"] = max((a.close() for a in ahead.values()), default=0.0)
    info["seconds"] = time.perf_counter() - t0
    return info


def _run_jobs(jobs, device, self_check, workers, finished, ahead) -> None:
    def one(m, b):
        ahead[b.name].wait(m)
        return _prepare_one(m, b, device, self_check)

    # a first layer alone compiles what nothing compiled ahead, once, before threads could race to
    serial = jobs if workers <= 1 else [] if all(a.covers for a in ahead.values()) else jobs[:1]
    for j in serial:
        finished(one(*j))
    if len(jobs) > len(serial):
        with ThreadPoolExecutor(workers) as pool:
            # each task sees the caller's context variables (active ops, overrides)
            futures = [pool.submit(contextvars.copy_context().run, _in_own_stream, lambda j=j: one(*j), device)
                       for j in jobs[len(serial):]]
            try:
                for f in as_completed(futures):
                    finished(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
