"""Launching compiled Triton kernels without Triton's per-call Python work.

A Triton call, `kernel[grid](*args)`, costs the host ~55 us on the H200's host, of which the
launch itself (Triton's C launcher) is ~11 us (BENCHMARKS.md, "Host time"). The rest is Python run
on every call: binding and specializing each argument, a str() of the options for the cache key,
and re-checking each module-level constant the kernel reads (a tl.constexpr comparison apiece, 13
for the w4a16 kernel). An eager FLUX step makes hundreds of such calls.

DirectLauncher(jit_fn) sends the first call of each variant through Triton, which compiles (or
finds) the binary, checks the constants and launches, and keeps the compiled kernel it returns.
Later calls of that variant launch the kept kernel directly. The variant key is finer than
Triton's specialization, so a kept binary serves only calls Triton would have served with it:
- each tensor: its dtype and whether its address is 16-byte aligned;
- each int and bool: its type and exact value (Triton keys ints on == 1, % 16 and their width);
- each float: its type (Triton does not specialize float values);
- every constexpr and launch option, the current device, and Triton's debug knob.

Direct launches follow Triton's launcher convention: the grid, the stream, the kernel's handles,
then every parameter (constexprs included) in signature order. supports_direct_launch() reads
that convention from this Triton's own JITFunction.run. Calls go through Triton instead when the
convention differs, a launch hook is set (profilers such as Proton), the kernel has pre-run hooks,
Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), torch.compile is tracing, or
NVFP4_DIRECT_LAUNCH=0.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

log = logging.getLogger(__name__)

MAX_KEPT = 4096  # variants kept per kernel (entries are small: a key and a reference)
ENV_VAR = "NVFP4_DIRECT_LAUNCH"  # "0": every launch through Triton (read once, at the first launch)

# The line of Triton's JITFunction.run that launches a kernel: the convention we reproduce.
_TRITON_LAUNCH_LINE = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                       "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                       "*bound_args.values())")


@functools.lru_cache(maxsize=None)
def supports_direct_launch() -> tuple[bool, str]:
    """Whether this Triton launches kernels the way DirectLauncher does, and specializes arguments
    no finer than its variant key (and why not; logged once)."""
    ok, why = _direct_launch_check()
    if not ok:  # asked for: info; found wanting: a warning
        (log.info if why.startswith(ENV_VAR) else log.warning)(
            "NVFP4: Triton kernels launch through Triton, ~45 us more host time a call (%s)", why)
    return ok, why


def _direct_launch_check() -> tuple[bool, str]:
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return False, f"{ENV_VAR}=0"
    if torch.version.hip is not None:
        return False, "ROCm: Triton's AMD backend specializes pointers on more than their alignment"
    try:
        from triton.backends.compiler import BaseBackend
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction
        src = " ".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, OSError, TypeError) as e:
        return False, f"Triton's launch path could not be read ({e})"
    if _TRITON_LAUNCH_LINE not in src:
        return False, "this Triton's JITFunction.run launches kernels differently from the convention we know"
    for spec in ("get_tensor_specialization", "get_int_specialization"):
        if getattr(CUDABackend, spec, None) is not getattr(BaseBackend, spec, None):
            return False, f"this Triton's CUDA backend has its own {spec}"
    return True, ""


_Tensor = torch.Tensor


def arg_keys(args: tuple) -> tuple:
    """Per argument: a tensor's dtype and whether its address is 16-byte aligned; a float's type
    alone (Triton does not specialize float values); anything else (ints, bools, None) its type
    and exact value. One comprehension, no call per argument: it runs on every launch."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor) else
                  float if a.__class__ is float else (a.__class__, a) for a in args])


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a callable, or a HookChain (Triton 3.5+) holding any."""
    return hook is not None and bool(getattr(hook, "calls", True))


def variant_key(args: tuple, options: dict, keys: tuple | None = None) -> tuple:
    """What tells two calls' variants apart (module docstring), but the device and knobs.
    keys: arg_keys(args), where the caller has it already."""
    return arg_keys(args) if keys is None else keys, tuple(options.items())


class DirectLauncher:
    """`launcher(grid, args, options)` runs `jit_fn[grid](*args, **options)`, directly where it can
    (`keys`: arg_keys(args), where the caller computed it already)."""

    def __init__(self, jit_fn):
        from triton.runtime.jit import JITFunction
        self.jit_fn = jit_fn
        self.kept: dict[tuple, tuple] = {}  # variant key -> (compiled kernel, trailing parameter values)
        self.enabled = False
        if not isinstance(jit_fn, JITFunction):  # TRITON_INTERPRET=1: Triton's CPU interpreter
            return
        if supports_direct_launch()[0]:
            self.enabled = True
            self.names = jit_fn.arg_names
            self.defaults = {p.name: p.default for p in jit_fn.params if p.default is not inspect.Parameter.empty}

    def __call__(self, grid: tuple, args: tuple, options: dict, keys: tuple | None = None):
        # under torch.compile, dynamo should see the Triton call it knows how to trace
        if not self.enabled or torch.compiler.is_compiling():
            return self.jit_fn[grid](*args, **options)
        from triton import knobs
        runtime = knobs.runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            return self.jit_fn[grid](*args, **options)
        device = torch.cuda.current_device()
        key = (device, runtime.debug, knobs.compilation.instrumentation_mode, variant_key(args, options, keys))
        kept = self.kept.get(key)
        if kept is None:
            return self._through_triton(key, grid, args, options)
        kernel, tail = kept
        if callable(grid):  # as Triton calls it: with every parameter by name
            grid = grid(dict(zip(self.names, args + tail)))
        g = tuple(grid) + (1, 1)
        kernel.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)
        return kernel

    def _through_triton(self, key, grid, args, options):
        kernel = self.jit_fn[grid](*args, **options)
        if hasattr(kernel, "result"):  # Triton's asynchronous compile mode
            kernel = kernel.result()
        if kernel is not None and not self.jit_fn.pre_run_hooks and kernel.function is not None:
            tail = tuple(options[n] if n in options else self.defaults[n] for n in self.names[len(args):])
            if len(self.kept) >= MAX_KEPT:  # exact ints in the key: many resolutions, many entries
                self.kept.clear()
            self.kept[key] = (kernel, tail)
        return kernel
