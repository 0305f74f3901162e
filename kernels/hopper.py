"""Fast paths for CUDA GPUs without FP4 tensor cores (Hopper, Ada, Ampere).

fp8   (SM89+): each NVFP4 layer becomes FP8 e4m3 with one scale per output channel at
       preparation time (on the GPU, one layer at a time); at run time activations are
       quantized per token in one Triton pass and torch._scaled_mm (rowwise scales, bias
       fused) does the GEMM. Parts with different weight_scale_2 fold into the per-channel
       scales, so a fused layer is one GEMM.
w4a16 (SM80+): a Triton GEMM reads the packed FP4 codes and e4m3 block scales and
       dequantizes in the kernel: weights stay at 4.5 bits.
"""
from __future__ import annotations

import importlib.util

import torch

from ..quant.layers import FP8
from .portable import bias_of, fp8_dequant_linear
from .registry import Backend, register

FP8_MAX = 448.0


def _cuda_cc(device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _triton_ok() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "needs Triton (it ships with PyTorch's CUDA wheels on Linux)"
    return True, ""


def fp8_weight(parts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 parts -> (fp8 e4m3 [N, K], fp32 per-channel scales [N]); computed on `device`."""
    w = torch.cat([p.dequantize(torch.float32, device) for p in parts])
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8Backend(Backend):
    name = "fp8"
    label = "fp8: NVFP4 -> FP8 weights, per-token FP8 activations, torch._scaled_mm (SM89+)"
    priority = 50
    prepares = True

    def capability(self, device):
        cc = _cuda_cc(device)
        if cc is None:
            return False, "needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or 9.x)"
        if cc < (8, 9):
            return False, f"FP8 tensor cores need compute capability 8.9+, this GPU is {cc[0]}.{cc[1]}"
        if not hasattr(torch, "_scaled_mm"):
            return False, "this PyTorch has no torch._scaled_mm"
        return _triton_ok()

    def prepare(self, module):
        from ..quant.nvfp4 import NVFP4Weight
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        parts = [NVFP4Weight(module._parameters[f"packed_{i}"].data, module._parameters[f"scale_{i}"].data,
                             module._parameters[f"gscale_{i}"].data) for i in range(module.n_parts)]
        q, scale = fp8_weight(parts, dev)
        return {"w": q.cpu(), "ws": scale.cpu()}

    def run(self, module, x):
        if module.format == FP8:
            return fp8_dequant_linear(module, x)
        from .triton_kernels import act_quant_fp8
        x2 = x.reshape(-1, x.shape[-1])
        q, xs = act_quant_fp8(x2)
        w = module.prep(self.name, "w", x.device)
        ws = module.prep(self.name, "ws", x.device)
        b = bias_of(module, x)
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        y = torch._scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.view(1, -1),
                             bias=None if b is None else b.to(out_dtype), out_dtype=out_dtype)
        module.last_path = self.name
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class W4A16Backend(Backend):
    name = "w4a16"
    label = "w4a16: Triton GEMM dequantizing FP4 weights in the kernel (SM80+)"
    priority = 40

    def capability(self, device):
        cc = _cuda_cc(device)
        if cc is None:
            return False, "needs a CUDA GPU (compute capability 8.0+)"
        if cc < (8, 0):
            return False, f"needs compute capability 8.0+ (bf16 tensor cores), this GPU is {cc[0]}.{cc[1]}"
        return _triton_ok()

    def run(self, module, x):
        if module.format == FP8:
            return fp8_dequant_linear(module, x)
        from .triton_kernels import w4a16_gemm
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty((x2.shape[0], module.out_features), device=x.device, dtype=torch.bfloat16)
        b = bias_of(module, x)
        col = 0
        for p in module.parts(x.device):
            n = p.shape[0]
            w4a16_gemm(x2, p.packed, p.block_scale, p.global_scale,
                       None if b is None else b[col:col + n].to(torch.bfloat16), out[:, col:col + n])
            col += n
        module.last_path = self.name
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


FP8_BACKEND = register(FP8Backend())
W4A16_BACKEND = register(W4A16Backend())
