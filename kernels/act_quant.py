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
    """Quantize-dequantize [M, K] activations to NVFP4 (float32 result), in the arithmetic order
    of FlashInfer's fp4_quantize (TRT-LLM's cvt_warp_fp16_to_fp4), all in fp32:
      SF  = e4m3(global_sf * (vec_max * (1/6)))          global_sf = 1/input_scale
      out = 1 / (SF * (1/global_sf))                      0 when SF == 0
      q   = e2m1_rn_satfinite(x * out)
    (the GPU uses approximate reciprocals, so a rare tie may still round the other way)."""
    in_scale = activation_scale(x2d, input_scale)
    g = 1.0 / in_scale                                   # what the Blackwell path passes as global_sf
    x = x2d.float()
    m, k = x.shape
    blocks = x.reshape(m, k // nvfp4.BLOCK, nvfp4.BLOCK)
    vec_max = blocks.abs().amax(-1)
    sf = (g * (vec_max * (1.0 / 6.0))).clamp(max=nvfp4.E4M3_MAX).to(torch.float8_e4m3fn).float()
    out_scale = torch.where(sf != 0, 1.0 / (sf * (1.0 / g)), torch.zeros_like(sf))
    codes = e2m1.encode(blocks * out_scale.unsqueeze(-1))
    vals = e2m1.decode(codes, torch.float32)
    return (vals * sf.unsqueeze(-1) * in_scale).reshape(m, k)
