"""Build ComfyUI's own FLUX model from an NVFP4 checkpoint, with our linear module as its Linear.

ComfyUI detects the architecture from the state dict it is given. We give it the checkpoint's
real non-linear parameters plus, for every linear, a meta-device placeholder of the TRUE
(N, K) shape (packed NVFP4 weights have K/2 columns and would mislead detection). The
linears' real tensors are handed to our module by name while the state dict loads.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.ops
import comfy.sd
import comfy.utils

from ..kernels import autotune, env_override, preparation, registry
from ..kernels.module import NVFP4LinearModule
from ..quant import Checkpoint
from ..quant.layers import NVFP4Linear

log = logging.getLogger("comfyui_nvfp4")

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NVFP4LoadError(RuntimeError):
    pass


def make_operations(layers: dict):
    """A ComfyUI operations class whose Linear takes its tensors from `layers` (name -> canonical)."""

    class Linear(NVFP4LinearModule):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            name = prefix[:-1]
            self.layer_name = name
            for suffix in ("weight", "bias"):
                state_dict.pop(prefix + suffix, None)  # the meta placeholders
            layer = layers.pop(name, None)
            if layer is None:
                missing_keys.append(prefix + "weight")
                return
            self.set_layer(layer)

    class Operations(comfy.ops.manual_cast):
        pass

    Operations.Linear = Linear
    return Operations


def comfy_state_dict(ck: Checkpoint, layers: dict) -> dict:
    sd = {k: ck.load_param(k) for k in ck.params}
    for name, layer in layers.items():
        n, k = layer.shape
        sd[f"{name}.weight"] = torch.empty((n, k), dtype=torch.bfloat16, device="meta")
        if layer.bias is not None:
            sd[f"{name}.bias"] = torch.empty((n,), dtype=torch.bfloat16, device="meta")
    return sd


class _CompileWhileLoading:
    """Called with each layer the loader reads: starts compiling in the background the GEMM
    kernels that the backends `auto` may pick on ComfyUI's device (only the one NVFP4_GEMM_BACKEND
    forces, where it is set) will run for each new layer shape (preparation.start_compiling;
    nothing on the CPU or where FlashInfer compiles its own), so the Backend node finds them ready
    (on a machine whose Triton cache is empty that is 2-3 s; 0.5 s from the cache). It never fails
    the load: an error is logged once, and preparation then compiles, and reports, for itself."""

    def __init__(self):
        self.backends, self.launches, self.failed = [], 0, None
        try:
            self.device = comfy.model_management.get_torch_device()
            candidates = autotune.auto_candidates(self.device)
            forced = env_override.read(registry.names())
            if forced not in (None, registry.AUTO):  # the only backend any Backend node will run
                candidates = [b for b in candidates if b.name == forced]
            self.backends = [b for b in candidates if b.prepares]
        except Exception as e:  # noqa: BLE001 - an early start is an optimisation only
            log.warning("NVFP4: not compiling kernels while loading: %s", e)

    def __call__(self, layer) -> None:
        if self.backends and self.failed is None and isinstance(layer, NVFP4Linear):
            try:
                self.launches += sum(a.launches for a in preparation.start_compiling([layer], self.device,
                                                                                      self.backends))
            except Exception as e:  # noqa: BLE001
                self.failed = e
                log.warning("NVFP4: could not start compiling kernels while loading (%s); preparation will "
                            "compile them", e)

    def report(self) -> None:
        if self.launches:
            log.info("NVFP4: compiling %d kernel launches in the background for %s", self.launches,
                     ", ".join(b.name for b in self.backends))


def load_nvfp4_model(path, compute_dtype: str = "auto", progress=None):
    """ModelPatcher for the checkpoint at `path`. `progress(done, total)` is called per layer."""
    ck = Checkpoint(path)
    if ck.flavour == "bf16":
        raise NVFP4LoadError(f"{path} holds no NVFP4 layers (a plain bf16 checkpoint): load it with "
                             f"ComfyUI's Load Diffusion Model node, or quantize it with `nvfp4 quantize`")
    layers = {}
    total = len(ck.layers)
    compile_early = _CompileWhileLoading()
    for i, name in enumerate(ck.layers):
        layers[name] = ck.load_linear(name)
        compile_early(layers[name])
        if progress:
            progress(i + 1, total)
    compile_early.report()
    sd = comfy_state_dict(ck, layers)
    expected = set(layers)
    options = {"custom_operations": make_operations(layers)}
    if DTYPES.get(compute_dtype) is not None:
        options["dtype"] = DTYPES[compute_dtype]
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if patcher is None:
        raise NVFP4LoadError(f"ComfyUI could not build a model from {path} ({ck.architecture})")
    modules = {m.layer_name: m for m in patcher.model.diffusion_model.modules() if isinstance(m, NVFP4LinearModule)}
    unloaded = sorted(n for n, m in modules.items() if m.format is None)
    unused = sorted(layers)  # whatever the model did not take
    if unloaded or unused:
        raise NVFP4LoadError(f"{path}: checkpoint and ComfyUI's {ck.architecture} model disagree: "
                             f"layers without weights {unloaded[:5]}, checkpoint layers not in the model "
                             f"{unused[:5]}")
    missing_in_model = expected - set(modules)
    if missing_in_model:
        raise NVFP4LoadError(f"{path}: layers not built by the model: {sorted(missing_in_model)[:5]}")
    patcher.model.nvfp4_info = {"path": str(path), "flavour": ck.flavour, "architecture": ck.architecture,
                                "formats": {n: m.format for n, m in modules.items()}}
    log.info("NVFP4: loaded %s (%s, %s): %d linears", path, ck.flavour, ck.architecture, len(modules))
    return patcher
