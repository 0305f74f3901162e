"""Check every layer of a checkpoint: readable, finite, shaped as the model needs, and
(with a bf16 reference) close to the original weights."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .errors import CheckpointError
from .layers import BF16, NVFP4Linear
from .reader import Checkpoint
from .shapes import FluxDims, linear_shapes

DEFAULT_MAX_REL_ERR = 0.2  # NVFP4 of Gaussian weights is about 0.10; a wrong layout is > 1


def verify_checkpoint(path, reference=None, *, max_rel_err: float = DEFAULT_MAX_REL_ERR,
                      flavour: str | None = None, progress: bool = True) -> dict:
    ck = Checkpoint(path, flavour)
    ref = Checkpoint(reference) if reference is not None else None
    if ref is not None and ref.architecture != ck.architecture:
        raise CheckpointError("reference is a different architecture", path=ref.path,
                              expected=ck.architecture, found=ref.architecture)
    expected = linear_shapes(FluxDims.of_checkpoint(ck))
    problems, report = [], {}
    for name in sorted(set(expected) - set(ck.layers)):
        problems.append(f"{name}: layer missing from the checkpoint (expected shape {list(expected[name])})")
    for name in tqdm(ck.layers, desc="verify", unit="layer", disable=not progress, leave=False):
        info = ck.layers[name]
        entry = {"format": info.format, "shape": list(info.shape)}
        report[name] = entry
        if name in expected and tuple(info.shape) != tuple(expected[name]):
            problems.append(f"{name}: shape {list(info.shape)} but the model needs {list(expected[name])}")
        try:
            layer = ck.load_linear(name)
        except CheckpointError as e:
            problems.append(f"{name}: {e}")
            entry["error"] = str(e)
            continue
        w = layer.dequantize(torch.float32)
        if not torch.isfinite(w).all():
            problems.append(f"{name}: dequantized weight has NaN/inf")
        if isinstance(layer, NVFP4Linear):
            zero = sum(int((p.block_scale.float() == 0).sum()) for p in layer.parts)
            total = sum(p.block_scale.numel() for p in layer.parts)
            entry["zero_block_fraction"] = zero / total
            entry["parts"] = len(layer.parts)
            if zero == total and w.abs().sum() == 0:
                problems.append(f"{name}: every block scale is zero (the layer is all zeros)")
        if ref is not None and info.format != BF16:
            if name not in ref.layers:
                problems.append(f"{name}: not in the reference checkpoint")
                continue
            r = ref.load_linear(name).dequantize(torch.float32)
            if r.shape != w.shape:
                problems.append(f"{name}: shape {list(w.shape)} vs reference {list(r.shape)}")
                continue
            err = float((w - r).norm() / r.norm().clamp(min=1e-30))
            entry["rel_err"] = err
            if not err <= max_rel_err:
                problems.append(f"{name}: relative error {err:.4f} exceeds {max_rel_err}")
    return {"path": str(ck.path), "flavour": ck.flavour, "architecture": ck.architecture,
            "ok": not problems, "problems": problems, "layers": report,
            "max_rel_err": max_rel_err if ref is not None else None}
