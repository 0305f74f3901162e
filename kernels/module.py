"""The linear module the DiT runs: canonical NVFP4 (or FP8 / dense) tensors as registered
parameters, executed by the selected backend, remembering which path it took.

All tensors are nn.Parameters (requires_grad=False): ComfyUI's model patchers move parameters
of modules without `comfy_cast_weights` wholesale between devices (the dynamic-VRAM patcher
keeps the CPU originals as backups), and never touch plain attributes. Prepared backend
layouts are parameters too (`prep_<backend>_<name>`), made from the CPU originals.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from ..quant.layers import BF16, FP8, NVFP4, DenseLinear, FP8Linear, NVFP4Linear
from ..quant.nvfp4 import NVFP4Weight
from . import registry
from .portable import fp8_dequant_linear

# The backend of the sampling run in progress (set by the model wrapper); modules fall back
# to their own `backend` attribute outside such a run.
ACTIVE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("nvfp4_backend", default=None)


@contextlib.contextmanager
def active_backend(name: str | None):
    """Run the enclosed forwards with backend `name` (None: each module's own `backend`)."""
    token = ACTIVE_BACKEND.set(name)
    try:
        yield
    finally:
        ACTIVE_BACKEND.reset(token)

_PARAM = dict(requires_grad=False)


class NVFP4LinearModule(torch.nn.Module):
    """Drop-in for torch.nn.Linear(in_features, out_features, bias) inside ComfyUI models."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.has_bias = bias
        self.format: str | None = None   # set when the state dict is loaded
        self.n_parts = 0
        self.layer_name = ""
        self.backend = "dequant"
        self.auto_choice: str | None = None  # this layer's backend under `auto` (set by the autotuner)
        self.last_path: str | None = None
        self.compute_dtype = dtype
        # Canonical tensors the active backend's layout replaces, kept out of _parameters so that
        # ComfyUI does not load them into VRAM (see park()); still saved by state_dict().
        self._parked: dict[str, torch.Tensor] = {}

    def __setattr__(self, name, value):
        # last_path is written on every call: straight into the instance dict, skipping
        # nn.Module.__setattr__'s parameter/buffer/module bookkeeping (a plain attribute either way)
        if name == "last_path":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    # ----- building from canonical layers -----
    def set_layer(self, layer) -> None:
        """Register a canonical layer's tensors (NVFP4Linear, FP8Linear or DenseLinear)."""
        for n in list(self._parameters):
            del self._parameters[n]
        n, k = layer.shape
        if (n, k) != (self.out_features, self.in_features):
            raise ValueError(f"{self.layer_name or 'linear'}: checkpoint layer is {n}x{k}, the model needs "
                             f"{self.out_features}x{self.in_features}")
        self.format = layer.format
        if isinstance(layer, NVFP4Linear):
            self.n_parts = len(layer.parts)
            for i, p in enumerate(layer.parts):
                self.register_parameter(f"packed_{i}", torch.nn.Parameter(p.packed, **_PARAM))
                self.register_parameter(f"scale_{i}", torch.nn.Parameter(p.block_scale, **_PARAM))
                self.register_parameter(f"gscale_{i}", torch.nn.Parameter(p.global_scale.float().reshape(()), **_PARAM))
                if p.input_scale is not None:
                    self.register_parameter(f"iscale_{i}", torch.nn.Parameter(p.input_scale.float().reshape(()), **_PARAM))
        elif isinstance(layer, FP8Linear):
            self.register_parameter("weight", torch.nn.Parameter(layer.weight, **_PARAM))
            self.register_parameter("weight_scale", torch.nn.Parameter(layer.weight_scale.reshape(()), **_PARAM))
            if layer.input_scale is not None:
                self.register_parameter("input_scale", torch.nn.Parameter(layer.input_scale.reshape(()), **_PARAM))
        else:
            self.register_parameter("weight", torch.nn.Parameter(layer.weight, **_PARAM))
        if layer.bias is not None:
            self.register_parameter("bias", torch.nn.Parameter(layer.bias, **_PARAM))
        elif self.has_bias:
            raise ValueError(f"{self.layer_name or 'linear'}: the model expects a bias, the checkpoint has none")

    # ----- reading tensors on the compute device -----
    def t(self, name: str, device: torch.device) -> torch.Tensor | None:
        p = self._parameters.get(name)
        if p is None:
            p = self._parked.get(name)
        if p is None:
            return None
        # Offloaded (lowvram/novram) layers stay on the CPU; fetch them like ComfyUI's cast does.
        return p if p.device == device else p.to(device, non_blocking=True)

    def parts(self, device: torch.device) -> list[NVFP4Weight]:
        return [NVFP4Weight(self.t(f"packed_{i}", device), self.t(f"scale_{i}", device),
                            self.t(f"gscale_{i}", device), self.t(f"iscale_{i}", device))
                for i in range(self.n_parts)]

    def stored_parts(self) -> list[NVFP4Weight]:
        """The NVFP4 parts where the parameters live now (what weight preparation reads)."""
        return self.parts(self.home_device())

    def stored(self, name: str) -> torch.Tensor | None:
        """A parameter or parked tensor where it lives now (no copy)."""
        p = self._parameters.get(name)
        return self._parked.get(name) if p is None else p

    def home_device(self) -> torch.device:
        """Where the layer's canonical weights live now."""
        return self.stored("packed_0").device

    def part_shape(self, i: int) -> tuple[int, int]:
        n, half_k = self.stored(f"packed_{i}").shape
        return n, half_k * 2

    def canonical(self):
        """The canonical layer back from the registered (CPU or GPU) tensors."""
        bias = self._parameters.get("bias")
        if self.format == NVFP4:
            return NVFP4Linear(self.stored_parts(), bias)
        if self.format == FP8:
            return FP8Linear(self.weight, self.weight_scale, self._parameters.get("input_scale"), bias)
        return DenseLinear(self.weight, bias)

    # ----- prepared layouts -----
    def prepared_backends(self) -> set[str]:
        return {n.split("_", 2)[1] for n in self._parameters if n.startswith("prep_")}

    def set_prepared(self, backend: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.register_parameter(f"prep_{backend}_{name}", torch.nn.Parameter(t, **_PARAM))

    def move_prepared(self, backend: str, device: torch.device) -> None:
        """Store a backend's prepared tensors on `device` (where the layer's originals live)."""
        from .transfer import to_device, to_host
        for n, p in self._parameters.items():
            if n.startswith(f"prep_{backend}_") and p.device != device:
                moved = to_host(p.data) if device.type == "cpu" else to_device(p.data, device)
                self._parameters[n] = torch.nn.Parameter(moved, **_PARAM)

    def park(self, names) -> int:
        """Take canonical tensors the prepared layout makes redundant out of the parameters (ComfyUI
        moves parameters to the GPU, so they would sit in VRAM unused); returns their bytes."""
        moved = 0
        for n in [n for n in self._parameters if n.startswith(tuple(f"{x}_" for x in names))]:
            self._parked[n] = self._parameters.pop(n).data
            moved += self._parked[n].numel() * self._parked[n].element_size()
        return moved

    def unpark(self) -> None:
        for n, t in self._parked.items():
            self.register_parameter(n, torch.nn.Parameter(t, **_PARAM))
        self._parked.clear()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for n, t in self._parked.items():
            destination[prefix + n] = t

    def drop_prepared(self, keep: str | None = None) -> int:
        """Free prepared layouts of every backend but `keep` (their parked canonical tensors
        become parameters again); returns bytes freed."""
        if keep is None or keep not in self.prepared_backends():
            self.unpark()
        freed = 0
        for n in [n for n in self._parameters if n.startswith("prep_")]:
            if keep is None or not n.startswith(f"prep_{keep}_"):
                freed += self._parameters[n].numel() * self._parameters[n].element_size()
                del self._parameters[n]
        return freed

    def prep(self, backend: str, name: str, device: torch.device) -> torch.Tensor:
        t = self.t(f"prep_{backend}_{name}", device)
        if t is None:
            raise RuntimeError(f"{self.layer_name}: weights for backend '{backend}' were not prepared "
                               f"(run the model through the NVFP4 GEMM Backend node)")
        return t

    # ----- running -----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format is None:
            raise RuntimeError(f"{self.layer_name or 'NVFP4 linear'}: no weights were loaded into this layer")
        if self.format == BF16:
            w = self.t("weight", x.device).to(x.dtype)
            b = self.t("bias", x.device)
            self.last_path = "bf16"
            return torch.nn.functional.linear(x, w, None if b is None else b.to(x.dtype))
        if self.format == FP8:  # FP8 layers of "mixed" files: the 4-bit backends don't apply
            return fp8_dequant_linear(self, x)
        return registry.get(self.backend_name()).run(self, x)

    def backend_name(self) -> str:
        """The backend this NVFP4 layer runs on now: the sampling run's, else its own; under
        'auto' the one the autotuner chose for its shape."""
        name = ACTIVE_BACKEND.get() or self.backend
        if name == registry.AUTO:
            name = self.auto_choice
            if name is None:
                raise RuntimeError(f"{self.layer_name}: 'auto' has not chosen a backend for this layer "
                                   f"(run the model through the NVFP4 GEMM Backend node)")
        return name

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"parts={self.n_parts}, backend={self.backend}")
