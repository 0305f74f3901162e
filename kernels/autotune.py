"""`auto`: pick the fastest available backend for each distinct GEMM shape, by measurement.

At first use every available backend (never `emulate`) is timed on each distinct (N, K) of the
model's NVFP4 layers, on random data, at the token counts (M) that kind of layer meets: the layers
fed the conditioning vector (modulation, time/guidance/text-vector embedders) at 1 and 16 rows
(one per image in the batch), all others at 512 and 4096 (text and image tokens at 1024x1024).
So one shape can get two winners: FLUX.1's 3072 -> 9216 is both a double block's qkv (tokens)
and a single block's modulation (one row). A call costs the larger of its GPU time (L2 emptied
before it, as inside a model step) and its host time (ComfyUI runs eagerly). The winners are
cached on disk per GPU name, library versions and this plugin's kernel sources, and reused. The
table is shown to the user.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..quant import names, nvfp4
from ..quant.layers import NVFP4Linear
from . import env_override, registry
from .module import NVFP4LinearModule

log = logging.getLogger("comfyui_nvfp4")
TOKENS, VECTOR = "tokens", "vector"
# the rows each kind of layer is timed at (summed): a vector-fed layer's M is the batch size
TOKEN_COUNTS = {TOKENS: (512, 4096), VECTOR: (1, 16)}
_memory: dict[str, dict] = {}
# ~10 ms at 2 GHz: the host queues all timed calls of a shape before the GPU reaches the first
SLEEP_CYCLES = 20_000_000


def kind_of(name: str) -> str:
    """VECTOR for the ComfyUI linear `name` fed the conditioning vector, else TOKENS."""
    return VECTOR if names.vector_fed(name) else TOKENS


def layer_key(module) -> tuple[int, int, str]:
    """(N, K, kind): what `choose` decides per layer."""
    return module.out_features, module.in_features, kind_of(module.layer_name)


def cache_path() -> Path:
    base = os.environ.get("NVFP4_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui_nvfp4")
    return Path(base) / "autotune.json"


def clear_memory() -> None:
    _memory.clear()


env_override.on_change(clear_memory)  # a changed override invalidates decisions made under the old one


def device_key(device: torch.device) -> str:
    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"{name}|torch {torch.__version__}|flashinfer {ver('flashinfer-python')}|triton {ver('triton')}"
            f"|kernels {kernels_digest()}")


@functools.lru_cache(maxsize=1)
def kernels_digest() -> str:
    """A hash of this package's kernels/ sources: an update that changes a kernel (or how it is
    timed) makes `auto` measure again instead of reusing winners timed on the old code."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def _load_disk() -> dict:
    p = cache_path()
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_disk(data: dict) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, p)


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """Bytes to overwrite before each timed call: twice the GPU's L2 (None on the CPU)."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def _time(fn, device, reps: int = 10, flush: torch.Tensor | None = None) -> float:
    """ms one call costs in a stream of calls: CUDA, the larger of its GPU time and its host time
    (medians of `reps` calls). GPU time: each call bracketed by its own events with `flush`
    overwritten before it (a step leaves L2 full of other data, and a 4-bit layer that fits L2
    must not be timed from it), all queued behind a GPU sleep so the host's launches do not stretch
    it. Host time: what issuing the call costs the CPU (ComfyUI runs eagerly; where a call's host
    side is longer than its GPU work, as for small-M calls, the host is what a step waits for)."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        host = []
        torch.cuda._sleep(SLEEP_CYCLES)
        for start, end in events:
            if flush is not None:
                flush.fill_(1)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1000)
            end.record()
        torch.cuda.synchronize(device)
        gpu = sorted(start.elapsed_time(end) for start, end in events)
        return max(gpu[len(gpu) // 2], sorted(host)[len(host) // 2])
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


def measure_shape(n: int, k: int, backends: list[registry.Backend], device: torch.device,
                  token_counts=TOKEN_COUNTS[TOKENS], dtype=torch.bfloat16) -> dict[str, float]:
    """Total ms over `token_counts` for each backend on a random NVFP4 layer of shape (n, k)."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = nvfp4.quantize(torch.randn(n, k, generator=g) / k ** 0.5)
    mod = NVFP4LinearModule(k, n, bias=True)
    mod.layer_name = f"autotune {n}x{k}"
    mod.set_layer(NVFP4Linear([w], torch.zeros(n, dtype=dtype)))
    for b in backends:
        if b.prepares:
            mod.set_prepared(b.name, b.prepare(mod))
    mod.to(device)
    flush = l2_flush_buffer(device)
    out = {}
    for b in backends:
        xs = [torch.randn(m, k, generator=g).to(device=device, dtype=dtype) for m in token_counts]
        if getattr(b, "flashinfer_backend", None):
            # FlashInfer's autotuner picks mm_fp4's tactics for these sizes first (saved to disk),
            # so the backend is timed with its best kernels.
            from .blackwell import flashinfer_tuning
            with flashinfer_tuning(flashinfer_cache_path(), tune=True):
                for x in xs:
                    b.run(mod, x)
        out[b.name] = sum(_time(lambda: b.run(mod, x), device, flush=flush) for x in xs)
    return out


def flashinfer_cache_path() -> Path:
    return cache_path().with_name("flashinfer_tactics.json")


def load_flashinfer_tactics() -> None:
    """Load tactics FlashInfer's autotuner saved earlier (no-op without FlashInfer or a file)."""
    if flashinfer_cache_path().exists():
        from .blackwell import flashinfer_tuning
        with flashinfer_tuning(flashinfer_cache_path(), tune=False):
            pass


def dtype_ok(backend: registry.Backend, dtype) -> bool:
    try:
        getattr(backend, "check_dtype", lambda d: None)(dtype)
        return True
    except ValueError:
        return False


def auto_candidates(device: torch.device, dtype=None) -> list[registry.Backend]:
    """What `auto` may pick: available here, not an accuracy tool, and (given the model's compute
    dtype) able to output it - mm_fp4 writes bf16/fp16 only, trtllm bf16 only - so nothing fails
    mid-sampling."""
    out = []
    for a in registry.availability(device):
        b = registry.get(a.name)
        if a.available and b.auto_eligible and (dtype is None or dtype_ok(b, dtype)):
            out.append(b)
    return out


def choose(shapes: set[tuple[int, int, str]], device: torch.device, candidates: list[registry.Backend] | None = None,
           measure=measure_shape) -> dict[tuple[int, int, str], dict]:
    """{(n, k, kind): {"winner": name, "ms": {backend: ms}, "source": "measured"|"cache"|"only"}}
    for the (N, K, TOKENS | VECTOR) of the layers (`layer_key`). `measure(n, k, backends, device,
    token_counts)` times them where nothing is cached."""
    if candidates is None:
        candidates = auto_candidates(device)
    if not candidates:
        raise registry.BackendUnavailableError(f"no NVFP4 backend can run on {registry.describe_device(device)}")
    dkey = device_key(device) + "|" + ",".join(sorted(b.name for b in candidates))
    disk = _load_disk()
    table = _memory.setdefault(dkey, dict(disk.get(dkey, {})))
    result, changed = {}, False
    for n, k, kind in sorted(shapes):
        if kind not in TOKEN_COUNTS:
            raise ValueError(f"auto: unknown layer kind {kind!r} for {n}x{k} (expected one of {sorted(TOKEN_COUNTS)})")
        key = f"{n}x{k} {kind}"
        if len(candidates) == 1:
            result[(n, k, kind)] = {"winner": candidates[0].name, "ms": {}, "source": "only"}
            continue
        if key not in table:
            ms = measure(n, k, candidates, device, TOKEN_COUNTS[kind])
            table[key] = {"winner": min(ms, key=ms.get), "ms": ms}
            changed = True
            log.info("NVFP4 auto: %s -> %s (%s)", key, table[key]["winner"],
                     ", ".join(f"{b} {t:.3f} ms" for b, t in ms.items()))
            source = "measured"
        else:
            source = "cache"
        result[(n, k, kind)] = {**table[key], "source": source}
    if changed:
        disk[dkey] = table
        _save_disk(disk)
    if any(getattr(b, "flashinfer_backend", None) for b in candidates):
        load_flashinfer_tactics()
    return result


def format_table(result: dict) -> str:
    lines = []
    for (n, k, kind), r in sorted(result.items()):
        times = ", ".join(f"{b} {t:.3f}" for b, t in sorted(r["ms"].items(), key=lambda kv: kv[1]))
        rows = "+".join(str(m) for m in TOKEN_COUNTS[kind])
        lines.append(f"{n}x{k} {kind} (M={rows}): {r['winner']} ({r['source']}{'; ms ' + times if times else ''})")
    return "\n".join(lines)
