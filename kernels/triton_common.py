"""Pieces shared by the Triton kernels: NVFP4 decoding and the small-M tile size.

E2M1 decoding through fp16 bits: code s|e1 e0|m placed at fp16 bits 15 and 11..9 is exactly
e2m1 * 2^-14 (the e=0 codes land on fp16 subnormals, which fp16 -> fp32 conversion keeps), so
a nibble costs ~5 integer ops and one conversion instead of a branchy bit-build. Callers fold
the 2^14 into the e4m3 block scale (exact in fp32), so v * scale is the exact e2m1 * e4m3.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..quant.layers import NVFP4Linear
from .fast_launch import DirectLauncher, arg_keys, variant_key
from .tuning import tuning_allowed


@triton.jit
def fp4_pair(byte):
    """int32 bytes -> (low nibble, high nibble) as fp32 e2m1 * 2^-14, exact."""
    lo = ((byte & 0x07) << 9) | ((byte & 0x08) << 12)
    hi = ((byte & 0x70) << 5) | ((byte & 0x80) << 8)
    return (lo.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32),
            hi.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def e4m3_scale(raw):
    """e4m3 block-scale bytes (uint8) -> fp32 scale * 2^14 (exact), for values decoded through
    fp16 bits as e2m1 * 2^-14 (fp4_pair)."""
    return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def fp8_row_scale(amax):
    """Per-token FP8 e4m3 scale for rows with this |max|: the row's values / scale fill +-448."""
    return tl.maximum(amax, 1e-12) / 448.0


@triton.jit
def fp8_codes(v, scale, q_ptr):
    """v / scale saturated to +-448, cast to q_ptr's element type (e4m3; fp32 where tests read
    the values before the e4m3 rounding)."""
    return tl.clamp(v / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty)


# Host-side integer helpers for the per-call paths. Triton 3.6 makes triton.cdiv and
# triton.next_power_of_2 constexpr functions: a host call unwraps every argument first, which
# costs more than the arithmetic. Same results as theirs.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (read once per device, not per call: the property query costs host
    time); 1 elsewhere (the interpreter, meta tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def row_tile(m: int) -> int:
    """Rows a small-M program holds: M rounded up to a power of two (M <= 16), at least 1."""
    return next_pow2(max(m, 1))


_AUTOTUNER_LOCK = threading.Lock()
_DIRECT: dict[int, DirectLauncher] = {}  # id of a module-level @triton.jit function -> its launcher
_PICKED: dict[tuple, dict] = {}  # (autotuner id, variant key) -> the config it picked for such calls


def direct(jit_fn) -> DirectLauncher:
    """The DirectLauncher of a module-level @triton.jit function (one per function)."""
    launcher = _DIRECT.get(id(jit_fn))
    if launcher is None:
        launcher = _DIRECT[id(jit_fn)] = DirectLauncher(jit_fn)
    return launcher


def launch(kernel, grid, args, kwargs, config: dict | None = None):
    """Run an autotuned kernel, or one of its configs by hand (`config`: one of configs_for's
    dicts; tests use it to run every config, also under TRITON_INTERPRET=1 where nothing is timed).
    Inside tuning.untuned() (the self-check) a call without a config runs the first one.
    The autotuner's pick is kept per variant (fast_launch.variant_key: finer than the autotuner's
    key), so later calls like it launch that config directly instead of through the autotuner."""
    if config is None and not tuning_allowed():
        config = configs_for(kernel, **kwargs)[0]
    keys = arg_keys(args)  # once: the pick's key and the direct launch's both start from it
    if config is None:
        key = (id(kernel), variant_key(args, kwargs, keys))
        config = _PICKED.get(key)
        if config is None:
            # Triton's Autotuner keeps each call's state on the kernel object (its argument dict,
            # the cache entry it fills while timing configs): calls from preparation's worker
            # threads (the self-check) must not interleave, or one reads the other's half-made entry
            with _AUTOTUNER_LOCK:
                kernel[grid](*args, **kwargs)
                picked = getattr(kernel, "best_config", None)
            if picked is not None:
                _PICKED[key] = picked.all_kwargs()
            return
    direct(kernel.fn)(grid, args, {**kwargs, **config}, keys)


def configs_for(kernel, **key) -> list[dict]:
    """The configs the autotuner would time for these constexpr values (after pruning), each as
    its constexprs plus its num_warps and num_stages (launch options a kernel call takes too)."""
    pruned = kernel.early_config_prune(kernel.configs, {}, **key) if kernel.early_config_prune else kernel.configs
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in pruned]


class Launch(NamedTuple):
    """One kernel launch: what a call runs, and what compile_ahead compiles ahead of it (a
    NamedTuple: built on every call, it costs less host time than a frozen dataclass)."""
    kernel: object  # a @triton.jit function
    grid: tuple
    args: tuple
    options: dict  # constexprs and launch options (num_warps, num_stages)


@dataclass(frozen=True)
class LayerShape:
    """What the kernel variants a layer needs depend on: its parts' rows, K and whether it has a bias."""
    rows: tuple[int, ...]
    k: int
    has_bias: bool

    @classmethod
    def of(cls, layer) -> "LayerShape":
        """Of an NVFP4LinearModule, or of a checkpoint's NVFP4Linear as the loader reads it."""
        if isinstance(layer, NVFP4Linear):
            return cls(tuple(p.shape[0] for p in layer.parts), layer.parts[0].shape[1], layer.bias is not None)
        return cls(tuple(layer.part_shape(i)[0] for i in range(layer.n_parts)), layer.in_features,
                   layer.stored("bias") is not None)
