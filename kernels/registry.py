"""One registry for every GEMM backend: what it can run on, how it prepares weights, how it runs.

A backend declares:
  name, label           id shown in the UI and in per-layer path reports
  priority              higher wins for `auto` among the backends this device can run
  capability(device)    (ok, reason) - never raises; reason says why not
  prepare(module)       tensors to register on the module before sampling (may be empty)
  run(module, x)        the layer's output for input x
  compile_ahead(modules, device)  start compiling, in the background, the kernels preparing and
                        running them needs; returns a KernelsAhead (optional)

Backends register themselves on import; `kernels/__init__.py` imports all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run on this device or install."""


class KernelsAhead:
    """Kernels a backend compiles in the background while preparation runs (Backend.compile_ahead).
    This base has nothing to compile: every wait returns at once."""
    launches = 0  # kernel launches this request queued (0: none, or all compiled before)
    covers = False  # True: every JIT kernel preparation runs is among them

    def wait(self, module) -> None:
        """Block until every kernel preparing and running `module` needs is compiled and loaded;
        raises the compile error of one that failed."""

    def order(self, module) -> int:
        """Where `module`'s kernels are in the compile queue: preparing layers in this order
        waits least."""
        return 0

    def close(self, cancel: bool = False) -> float:
        """Wait for the rest and return the wall seconds compiling took from this request on
        (cancel=True, after an error: return at once, leaving what runs to finish unwatched)."""
        return 0.0


class Backend:
    name: str = ""
    label: str = ""
    priority: int = 0
    auto_eligible: bool = True   # False for accuracy tools such as `emulate`
    prepares: bool = False       # True when prepare() makes per-layer weight layouts
    parallel_prepare: bool = True  # layers may be prepared (and self-checked) in several threads
    # canonical tensors (by name prefix: packed, scale) the prepared layout makes unnecessary at
    # run time; they are parked off the parameters so that they never occupy VRAM
    replaces: tuple[str, ...] = ()

    def capability(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, module) -> dict[str, torch.Tensor]:
        return {}

    def run(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compile_ahead(self, modules, device: torch.device) -> KernelsAhead:
        """Start compiling the JIT kernels that preparing and self-checking `modules` (NVFP4 linear
        modules, or the checkpoint layers the loader reads) on `device` will run, several at once
        and in the background, the first modules' shapes first; preparation waits per layer
        (KernelsAhead.wait) only for that layer's kernels."""
        return KernelsAhead()


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendUnavailableError(f"unknown NVFP4 backend {name!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        cc = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]})"
    return f"{device.type.upper()} (no CUDA GPU)" if device.type == "cpu" else str(device)


@dataclass
class Availability:
    name: str
    label: str
    available: bool
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "available": self.available, "reason": self.reason}


def availability(device: torch.device) -> list[Availability]:
    out = []
    for name in names():
        b = _REGISTRY[name]
        try:
            ok, reason = b.capability(device)
        except Exception as e:  # a capability probe must never take the UI down
            ok, reason = False, f"capability check failed: {e!r}"
        out.append(Availability(b.name, b.label, ok, reason))
    return out


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to use for `name` on `device`; `auto` takes the best available.

    An unavailable explicit choice raises with the device, its compute capability and the
    backends it does have - at selection time, never mid-sampling.
    """
    avail = availability(device)
    if name == AUTO:
        for a in avail:
            if a.available and _REGISTRY[a.name].auto_eligible:
                return _REGISTRY[a.name]
        raise BackendUnavailableError(f"no NVFP4 backend can run on {describe_device(device)}")
    b = get(name)
    mine = next(a for a in avail if a.name == name)
    if not mine.available:
        have = ", ".join(a.name for a in avail if a.available) or "none"
        raise BackendUnavailableError(
            f"NVFP4 backend '{name}' is not available on {describe_device(device)}: {mine.reason}. "
            f"Available here: {have}.")
    return b
