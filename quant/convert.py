"""Whole-checkpoint operations: convert between flavours, quantize bf16 to NVFP4."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from . import names, nvfp4
from .errors import CheckpointError
from .layers import NVFP4Linear
from .reader import COMFY, DENSE, MODELOPT, Checkpoint
from .store import TensorStore
from .writer import WriteReport, write_checkpoint


def _progress(items, desc: str, enabled: bool):
    return tqdm(items, desc=desc, unit="layer", disable=not enabled, leave=False)


def _params(ck: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: ck.load_param(k) for k in ck.params}


def convert_checkpoint(src, to: str, out, *, flavour: str | None = None, overwrite: bool = False,
                       progress: bool = True) -> WriteReport:
    """ModelOpt -> ComfyUI (`to="comfy"`) or ComfyUI/BFL -> ModelOpt (`to="modelopt"`)."""
    if to not in (COMFY, MODELOPT):
        raise ValueError(f"--to must be comfy or modelopt, got {to!r}")
    ck = Checkpoint(src, flavour)
    if ck.flavour == DENSE:
        raise CheckpointError("checkpoint is not quantized; use `nvfp4 quantize`", path=ck.path)
    layers = ((n, ck.load_linear(n)) for n in _progress(ck.layers, f"convert -> {to}", progress))
    return write_checkpoint(out, ck.architecture, layers, _params(ck), flavour=to, overwrite=overwrite)


def load_calibration(path) -> dict[str, torch.Tensor]:
    """Calibration file: safetensors, key = layer name (ComfyUI or diffusers), value = the
    activation amax (one element) or sample activations [..., K] whose abs-max is used."""
    store = TensorStore([Path(path)])
    return {k: store.get(k) for k in store.keys()}


def quantize_checkpoint(src, fmt: str, out, *, exclude=(), default_exclude: bool = True,
                        calibration: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
                        progress: bool = True) -> WriteReport:
    """Quantize every linear of a bf16 FLUX checkpoint to NVFP4 (ModelOpt conventions).

    Excluded: ModelOpt's FLUX defaults (embedders, norm_out, final proj_out, time/guidance
    embedders) unless default_exclude=False, plus `exclude` glob patterns (matched against
    ComfyUI and diffusers names). input_scale comes from `calibration` when it names the
    layer; otherwise it is omitted and runtimes compute the activation amax per call.
    """
    ck = Checkpoint(src)
    if ck.flavour != DENSE:
        raise CheckpointError("checkpoint is already quantized; use `nvfp4 convert`", path=ck.path,
                              found=ck.flavour)
    patterns = tuple(exclude) + (names.DEFAULT_EXCLUDE if default_exclude else ())
    # Amax per layer; sample activations reduce to their abs-max.
    calibration = {k: torch.as_tensor(v).float().abs().amax() for k, v in (calibration or {}).items()}
    skipped = []
    hidden = ck.hidden_size

    def layers():
        for name in _progress(ck.layers, f"quantize -> {fmt}", progress):
            layer = ck.load_linear(name)
            spec = ck.names.linears[name]
            if names.is_excluded(name, spec, patterns):
                yield name, layer
                continue
            if layer.shape[1] % nvfp4.BLOCK:
                skipped.append(name)
                yield name, layer
                continue
            amax = calibration.get(name)
            if amax is None:
                found = [calibration[s] for s in spec.sources if s in calibration]
                amax = torch.stack(found).max() if found else None
            in_scale = None if amax is None else nvfp4.input_scale_from_amax(amax)
            # ModelOpt gives q/k/v one global scale and proj_mlp its own; ComfyUI files have
            # one per fused layer. Follow the target format's convention.
            groups = spec.scale_groups(layer.shape[0], hidden) if fmt == MODELOPT else [layer.shape[0]]
            parts = [nvfp4.quantize(w, in_scale) for w in layer.weight.split(groups)]
            yield name, NVFP4Linear(parts, layer.bias)

    report = write_checkpoint(out, ck.architecture, layers(), _params(ck), flavour=fmt, overwrite=overwrite)
    report.skipped = skipped
    return report
