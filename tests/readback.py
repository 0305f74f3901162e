"""A CPU stand-in for FlashInfer's fp4_quantize and mm_fp4 that reads every layout back with
independent code: the byte-offset formula of the 128x4 layout (not the reshape used to build
it), the TRT-LLM row-shuffle formula, and bit-field decoding of E2M1 / E4M3.

It takes exactly the tensors a Blackwell GPU would receive, so a wrong layout shows up as a
wrong product, the way it would on the GPU (noise, a flat image) - but here with a test failing.
"""
from __future__ import annotations

import numpy as np
import torch

from reference import e2m1_value, e4m3_to_float, swizzle_offset

MAGS = np.array([e2m1_value(c) for c in range(8)])


def encode_nearest_even(v: np.ndarray) -> np.ndarray:
    """E2M1 codes by brute force: nearest magnitude, ties to the even code, saturating."""
    a = np.minimum(np.abs(v), 6.0)
    d = np.abs(a[..., None] - MAGS)
    best = np.argmin(d + (np.arange(8) % 2) * 1e-12, axis=-1)  # equal distance -> even index
    return (best | np.where(v < 0, 8, 0)).astype(np.uint8)


def write_swizzled(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    flat = np.zeros(rp * cp, dtype=np.uint8)
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            flat[swizzle_offset(r, c, cp)] = s[r, c]
    return flat.reshape(rp, cp)


def read_swizzled(t: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    flat = t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.is_contiguous() else \
        t.t().contiguous().t().contiguous().view(torch.uint8).reshape(-1).numpy()
    cp = -(-cols // 4) * 4
    out = np.zeros((rows, cols), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = flat[swizzle_offset(r, c, cp)]
    return out


def trtllm_source_row(j: int) -> int:
    return (j // 32) * 32 + (j % 8) * 4 + (j % 32) // 8


def unshuffle(rows_arr: np.ndarray) -> np.ndarray:
    out = np.empty_like(rows_arr)
    for j in range(rows_arr.shape[0]):
        out[trtllm_source_row(j)] = rows_arr[j]
    return out


def dequant_packed(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Low-nibble-first packed codes [R, K/2] and e4m3 scale bytes [R, K/16] -> float64 [R, K]."""
    table = np.array([e2m1_value(c) for c in range(16)])
    vals = np.stack([table[packed & 0xF], table[packed >> 4]], axis=-1).reshape(packed.shape[0], -1)
    return vals * np.repeat(e4m3_to_float(scales), 16, axis=1)


class ReadbackOps:
    """Drop-in for FlashInferOps (kernels/blackwell.py), on the CPU."""

    def __init__(self, check_with_flashinfer: bool = True):
        self.calls = []
        self.check = None
        if check_with_flashinfer:
            try:
                from flashinfer.gemm.gemm_base import _check_mm_fp4_problem_size
                self.check = _check_mm_fp4_problem_size
            except ImportError:
                self.check = None

    def fp4_quantize(self, x: torch.Tensor, global_sf: torch.Tensor):
        """FlashInfer's documented recipe (cvt_warp_fp16_to_fp4), in numpy float32."""
        f32 = np.float32
        xf = x.float().numpy().astype(f32)
        g = f32(global_sf.reshape(-1)[0])
        m, k = xf.shape
        blocks = xf.reshape(m, k // 16, 16)
        sf_f = (g * (np.abs(blocks).max(-1) * (f32(1) / f32(6)))).astype(f32)
        sf = torch.from_numpy(np.minimum(sf_f, f32(448))).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        sf_val = e4m3_to_float(sf).astype(f32)
        with np.errstate(divide="ignore"):
            out_scale = np.where(sf_val != 0, f32(1) / (sf_val * (f32(1) / g)), f32(0)).astype(f32)
        q = (blocks * out_scale[..., None]).astype(f32).reshape(m, k)
        codes = encode_nearest_even(q.astype(np.float64))
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        return torch.from_numpy(packed), torch.from_numpy(write_swizzled(sf, m, k // 16)).view(torch.float8_e4m3fn)

    def mm_fp4(self, a, b, a_descale, b_descale, alpha, out_dtype, backend):
        self.calls.append(dict(a=a.shape, b=b.shape, b_strides=b.stride(), a_descale=a_descale.shape,
                               b_descale=b_descale.shape, alpha=alpha, out_dtype=out_dtype, backend=backend))
        if self.check is not None:
            self.check(a, b, a_descale, b_descale, alpha, out_dtype, None, 16, False, backend, True)
        m, half_k = a.shape
        k = half_k * 2
        n = b.shape[1]
        assert b.shape[0] == half_k, "b must be [K/2, N]"
        assert b.stride() == (1, half_k), f"b must be the column-major view W.T, strides {b.stride()}"
        assert b_descale.stride()[0] == 1, "b_descale must be the transposed view W_sf.T"
        assert alpha.dtype == torch.float32 and alpha.numel() == 1
        w_packed = b.t().contiguous().numpy()                 # [N, K/2]
        w_sf = read_swizzled(b_descale.t(), n, k // 16)        # [N, K/16] linear, by the offset formula
        if backend == "trtllm":
            assert n % 128 == 0, "trtllm weights are padded to 128 rows"
            w_packed, w_sf = unshuffle(w_packed), unshuffle(w_sf)
        a_sf = read_swizzled(a_descale, m, k // 16)
        A = dequant_packed(a.numpy(), a_sf)
        W = dequant_packed(w_packed, w_sf)
        self.calls[-1].update(A=A, alpha_value=float(alpha.reshape(-1)[0]))
        out = (A @ W.T) * float(alpha.reshape(-1)[0])
        return torch.from_numpy(out).to(out_dtype)
