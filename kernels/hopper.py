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

from .portable import bias_of
from .registry import Backend, register

FP8_MAX = 448.0
GEMV_MAX_M = 4


def _cuda_cc(device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _triton_ok() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "needs Triton (it ships with PyTorch's CUDA wheels on Linux)"
    return True, ""


# Per-channel scale candidates, as fractions of amax/448. Dequantized NVFP4 values (e2m1 * e4m3,
# up to 6 significant bits) round to e4m3's 4 bits; shrinking the scale by k/16 lines more of
# them up with the e4m3 grid. Picking the best of 8 per row cut the weight error from 2.8% to
# 2.2% (GEMM error 3.9% -> 3.5%) on NVFP4-quantized Gaussian weights.
SCALE_CANDIDATES = tuple(1.0 - i / 16 for i in range(8))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Device -> pinned host copy (pageable copies ran at a fraction of PCIe speed)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def fp8_weight(parts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 parts -> (fp8 e4m3 [N, K], fp32 per-channel scales [N]); computed on `device`.

    Each row takes the candidate scale with the smallest squared rounding error."""
    w = torch.cat([p.dequantize(torch.float32, device) for p in parts])
    amax = w.abs().amax(dim=1, keepdim=True)
    base = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    best_q = best_s = best_e = None
    for ratio in SCALE_CANDIDATES:
        s = base * ratio
        q = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        e = (q.float().mul_(s).sub_(w)).square_().sum(dim=1, keepdim=True)
        if best_q is None:
            best_q, best_s, best_e = q, s, e
        else:
            better = e < best_e
            best_q = torch.where(better, q, best_q)
            best_s = torch.where(better, s, best_s)
            best_e = torch.minimum(e, best_e)
    return best_q, best_s.reshape(-1)


class FP8Backend(Backend):
    name = "fp8"
    label = "fp8: NVFP4 -> FP8 weights, per-token FP8 activations, torch._scaled_mm (SM89+)"
    priority = 50
    prepares = True
    # cuBLAS fast (non-promoting) FP8 accumulation: on the H100 it took the FLUX.1-dev GEMMs from
    # 1.32x to 1.58x bf16 (geomean) with the same error (3.44% both): see BENCHMARKS.md.
    fast_accum = True

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
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        q, scale = fp8_weight(module.stored_parts(), dev)
        return {"w": _to_host(q), "ws": _to_host(scale)}

    def run(self, module, x):
        from .triton_kernels import act_quant_fp8, fp8_gemv
        x2 = x.reshape(-1, x.shape[-1])
        w = module.prep(self.name, "w", x.device)
        ws = module.prep(self.name, "ws", x.device)
        b = bias_of(module, x)
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        b = None if b is None else b.to(out_dtype)
        if x2.shape[0] <= GEMV_MAX_M:
            # cuBLAS's FP8 GEMM is slow at M=1 (0.19 ms vs bf16's 0.05 on 3072x18432, H100):
            # a GEMV over the same FP8 weights streams them once (bf16 activations, no quantization).
            y = fp8_gemv(x2, w, ws, b, out_dtype)
            module.last_path = "fp8-gemv"
        else:
            q, xs = act_quant_fp8(x2)
            y = torch._scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=b, out_dtype=out_dtype,
                                 use_fast_accum=self.fast_accum)
            module.last_path = self.name
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class W4A16Backend(Backend):
    name = "w4a16"
    label = "w4a16: Triton GEMM dequantizing FP4 weights in the kernel (SM80+)"
    priority = 40
    prepares = True

    def capability(self, device):
        cc = _cuda_cc(device)
        if cc is None:
            return False, "needs a CUDA GPU (compute capability 8.0+)"
        if cc < (8, 0):
            return False, f"needs compute capability 8.0+ (bf16 tensor cores), this GPU is {cc[0]}.{cc[1]}"
        return _triton_ok()

    def prepare(self, module):
        """The split-half nibble order (same bytes as canonical, replaces it on the GPU).
        Layers whose K is not a multiple of 128 get nothing and run `dequant` (reported)."""
        from .w4a16_layout import split_half_pack
        if module.in_features % 128:
            return {}
        return {f"w{i}": split_half_pack(p.packed) for i, p in enumerate(module.stored_parts())}

    def run(self, module, x):
        if module.in_features % 128:
            from .portable import DEQUANT
            return DEQUANT.run(module, x)
        from .triton_kernels import w4a16_gemm
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty((x2.shape[0], module.out_features), device=x.device, dtype=torch.bfloat16)
        b = bias_of(module, x)
        col = 0
        for i, p in enumerate(module.parts(x.device)):
            n = p.shape[0]
            w4a16_gemm(x2, module.prep(self.name, f"w{i}", x.device), p.block_scale, p.global_scale,
                       None if b is None else b[col:col + n].to(torch.bfloat16), out[:, col:col + n])
            col += n
        module.last_path = self.name
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


FP8_BACKEND = register(FP8Backend())
W4A16_BACKEND = register(W4A16Backend())
