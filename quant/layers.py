"""In-memory layers in canonical form, one class per storage format."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .nvfp4 import NVFP4Weight

NVFP4, FP8, BF16 = "nvfp4", "fp8", "bf16"


@dataclass
class NVFP4Linear:
    """A linear whose weight is NVFP4. Usually one part; fused layers whose sources had
    different weight_scale_2 keep one exact part per group of output rows."""
    parts: list[NVFP4Weight]
    bias: torch.Tensor | None = None
    format = NVFP4

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def dequantize(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype, device) for p in self.parts])


@dataclass
class FP8Linear:
    """A per-tensor-scaled float8_e4m3fn linear (the "mixed" ComfyUI files)."""
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    format = FP8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=torch.float32, device=None) -> torch.Tensor:
        w = self.weight if device is None else self.weight.to(device)
        return (w.float() * self.weight_scale.to(w.device).float()).to(dtype)


@dataclass
class DenseLinear:
    """An unquantized linear (bf16/fp16/fp32 as stored)."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    format = BF16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.weight.to(device=device, dtype=dtype)


def swap_row_halves(layer):
    """diffusers' norm_out stores (scale, shift); BFL stores (shift, scale). Swapping twice is identity."""
    def swap(t):
        if t is None:
            return None
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a])

    if isinstance(layer, NVFP4Linear):
        if len(layer.parts) != 1:
            raise ValueError("cannot swap halves of a multi-part NVFP4 layer")
        p = layer.parts[0]
        return NVFP4Linear([NVFP4Weight(swap(p.packed), swap(p.block_scale), p.global_scale, p.input_scale)],
                           swap(layer.bias))
    if isinstance(layer, FP8Linear):
        return FP8Linear(swap(layer.weight), layer.weight_scale, layer.input_scale, swap(layer.bias))
    return DenseLinear(swap(layer.weight), swap(layer.bias))
