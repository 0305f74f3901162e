"""NVFP4 activation quantization as Blackwell does it, in portable torch (for emulation).

Blackwell kernels quantize activations per 16-element block along K with an e4m3 block scale
and a per-tensor global scale `1/input_scale` (FlashInfer `fp4_quantize(x, 1/input_scale)`),
saturating at the calibrated range. When a file has no input_scale, the amax of the current
activations is used (a dynamic per-tensor scale, never 1.0).
"""
from __future__ import annotations

import torch

from ..quant import e2m1, nvfp4


def activation_scale(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    if input_scale is not None:
        return input_scale.to(x.device, torch.float32).reshape(())
    return nvfp4.global_scale_for(x.detach().abs().amax().float())


def fake_quantize(x2d: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize [M, K] activations to NVFP4 (float32 result)."""
    gs = activation_scale(x2d, input_scale)
    x = x2d.float()
    m, k = x.shape
    blocks = x.reshape(m, k // nvfp4.BLOCK, nvfp4.BLOCK)
    scale = (blocks.abs().amax(-1) / (6.0 * gs)).clamp(max=nvfp4.E4M3_MAX).to(torch.float8_e4m3fn).float()
    denom = (scale * gs).unsqueeze(-1)
    q = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(blocks))
    vals = e2m1.decode(e2m1.encode(q.clamp(-6.0, 6.0)), torch.float32)
    return (vals * denom).reshape(m, k)
