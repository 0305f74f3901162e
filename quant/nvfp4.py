"""The canonical NVFP4 weight and the ModelOpt-convention quantizer.

Canonical form, whatever file it came from:
  packed       uint8 [N, K/2], element 2i in the LOW nibble
  block_scale  float8_e4m3fn [N, K/16], plain row-major
  global_scale float32 scalar tensor (ModelOpt's weight_scale_2)
  input_scale  float32 scalar tensor, or None when the file has none
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import e2m1

BLOCK = 16
E4M3_MAX = 448.0
FP4_FP8_RANGE = e2m1.E2M1_MAX * E4M3_MAX  # 6 * 448


@dataclass
class NVFP4Weight:
    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    input_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return dequantize(self, dtype=dtype, device=device)

    def rows(self, start: int, stop: int) -> "NVFP4Weight":
        """Output rows [start, stop): a slice that keeps the scales (for splitting fused layers)."""
        return NVFP4Weight(self.packed[start:stop], self.block_scale[start:stop],
                           self.global_scale, self.input_scale)

    def same_scales(self, other: "NVFP4Weight") -> bool:
        """True when the two can be concatenated along N without changing a single value."""
        if not torch.equal(self.global_scale.float().reshape(()), other.global_scale.float().reshape(())):
            return False
        a, b = self.input_scale, other.input_scale
        if a is None or b is None:
            return a is None and b is None
        return torch.equal(a.float().reshape(()), b.float().reshape(()))


def concat_rows(parts: list[NVFP4Weight]) -> NVFP4Weight:
    """Exact concatenation of parts that share global and input scales."""
    first = parts[0]
    for p in parts[1:]:
        if not first.same_scales(p):
            raise ValueError("concat_rows: parts have different weight_scale_2/input_scale")
    return NVFP4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.block_scale for p in parts]),
                       first.global_scale, first.input_scale)


def dequantize(w: NVFP4Weight, dtype=torch.float32, device=None) -> torch.Tensor:
    """W[n,k] = e2m1(code) * e4m3(block_scale) * weight_scale_2, rounded once to `dtype`.

    The product of the first two factors is exact in fp32; only the global multiply rounds.
    """
    packed = w.packed if device is None else w.packed.to(device)
    scale = w.block_scale if device is None else w.block_scale.to(device)
    n, half_k = packed.shape
    vals = e2m1.decode(e2m1.unpack(packed), torch.float32).reshape(n, half_k * 2 // BLOCK, BLOCK)
    vals = vals * scale.float().unsqueeze(-1)
    gs = w.global_scale.to(vals.device, torch.float32)
    return (vals * gs).reshape(n, half_k * 2).to(dtype)


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's weight_scale_2 = amax / (6 * 448). An all-zero tensor gets 1.0 (any positive
    value dequantizes its zero codes to zero, and it keeps the scale finite and non-zero)."""
    amax = amax.float()
    gs = amax / FP4_FP8_RANGE
    return torch.where(amax > 0, gs, torch.ones_like(gs))


def quantize(weight: torch.Tensor, input_scale: torch.Tensor | float | None = None,
             global_scale: torch.Tensor | None = None) -> NVFP4Weight:
    """Quantize a [N, K] weight (K % 16 == 0) with ModelOpt's conventions.

    Block scale = e4m3(block_amax / (6 * weight_scale_2)); codes = nearest-even E2M1 of
    W / (block_scale * weight_scale_2); all-zero blocks get scale 0 and code 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"quantize: K={k} is not a multiple of {BLOCK}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize: weight contains NaN or inf")
    if global_scale is None:
        global_scale = global_scale_for(w.abs().amax())
    gs = global_scale.float().reshape(())
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    scale_f = (block_amax / (e2m1.E2M1_MAX * gs)).clamp(max=E4M3_MAX)
    block_scale = scale_f.to(torch.float8_e4m3fn)
    denom = block_scale.float().unsqueeze(-1) * gs
    scaled = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, torch.ones_like(denom)),
                         torch.zeros_like(blocks))
    codes = e2m1.encode(scaled.reshape(n, k))
    if input_scale is not None and not isinstance(input_scale, torch.Tensor):
        input_scale = torch.tensor(float(input_scale), dtype=torch.float32)
    return NVFP4Weight(e2m1.pack(codes, low_nibble_first=True), block_scale, gs.clone(),
                       None if input_scale is None else input_scale.float().reshape(()))


def input_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt's input_scale = calibrated amax(x) / (6 * 448)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return torch.where(amax > 0, amax / FP4_FP8_RANGE, torch.ones_like(amax))
