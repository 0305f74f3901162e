"""`auto`: pick the fastest available backend for each distinct GEMM shape, by measurement.

At first use every available backend (never `emulate`) is timed on each distinct (N, K) of the
model's NVFP4 layers, at a few token counts (M), on random data; the winner per shape is cached
on disk per GPU name and library versions, and reused. The table is shown to the user.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from ..quant import nvfp4
from ..quant.layers import NVFP4Linear
from . import env_override, registry
from .module import NVFP4LinearModule

log = logging.getLogger("comfyui_nvfp4")
TOKEN_COUNTS = (1, 512, 4096)  # modulation GEMMs, text tokens, image tokens at 1024x1024
_memory: dict[str, dict] = {}


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
    return f"{name}|torch {torch.__version__}|flashinfer {ver('flashinfer-python')}|triton {ver('triton')}"


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


def _time(fn, device, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


def measure_shape(n: int, k: int, backends: list[registry.Backend], device: torch.device,
                  token_counts=TOKEN_COUNTS, dtype=torch.bfloat16) -> dict[str, float]:
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
        out[b.name] = sum(_time(lambda: b.run(mod, x), device) for x in xs)
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


def choose(shapes: set[tuple[int, int]], device: torch.device, candidates: list[registry.Backend] | None = None,
           measure=measure_shape) -> dict[tuple[int, int], dict]:
    """{(n, k): {"winner": name, "ms": {backend: ms}, "source": "measured"|"cache"|"only"}}."""
    if candidates is None:
        candidates = auto_candidates(device)
    if not candidates:
        raise registry.BackendUnavailableError(f"no NVFP4 backend can run on {registry.describe_device(device)}")
    dkey = device_key(device) + "|" + ",".join(sorted(b.name for b in candidates))
    disk = _load_disk()
    table = _memory.setdefault(dkey, dict(disk.get(dkey, {})))
    result, changed = {}, False
    for n, k in sorted(shapes):
        key = f"{n}x{k}"
        if len(candidates) == 1:
            result[(n, k)] = {"winner": candidates[0].name, "ms": {}, "source": "only"}
            continue
        if key not in table:
            ms = measure(n, k, candidates, device)
            table[key] = {"winner": min(ms, key=ms.get), "ms": ms}
            changed = True
            log.info("NVFP4 auto: %s -> %s (%s)", key, table[key]["winner"],
                     ", ".join(f"{b} {t:.3f} ms" for b, t in ms.items()))
            source = "measured"
        else:
            source = "cache"
        result[(n, k)] = {**table[key], "source": source}
    if changed:
        disk[dkey] = table
        _save_disk(disk)
    if any(getattr(b, "flashinfer_backend", None) for b in candidates):
        load_flashinfer_tactics()
    return result


def format_table(result: dict) -> str:
    lines = []
    for (n, k), r in sorted(result.items()):
        times = ", ".join(f"{b} {t:.3f}" for b, t in sorted(r["ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"{n}x{k}: {r['winner']} ({r['source']}{'; ms ' + times if times else ''})")
    return "\n".join(lines)
