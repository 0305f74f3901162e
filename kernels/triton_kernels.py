"""Triton kernels for GPUs without FP4 tensor cores (imported only when such a backend runs).

act_quant_fp8: per-token FP8 e4m3 quantization in ONE pass (each row read once: the row's amax
  and the scaled cast come from the same registers).
w4a16: y = x @ dequant(W).T + bias with W read as 4-bit E2M1 codes + e4m3 block scales. Codes are
  decoded by building the bf16 bit pattern directly; e2m1 * e4m3 is exact in bf16, so nothing
  rounds before the fp32 accumulator; weight_scale_2 multiplies the accumulator at the end.
  The weight is prepared in a "split-half" nibble order per 128-wide K block: byte j of a block
  holds elements j (low nibble) and j + 64 (high nibble), so the two nibble planes feed two
  tl.dot calls against the two halves of the activation tile, with no interleaving shuffle.
  Small M (<= 4, e.g. the M=1 modulation GEMMs) runs a GEMV kernel that streams the weight once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
from .w4a16_layout import KBLOCK


@triton.jit
def _act_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, 1e-12) / 448.0
    q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < M)


def act_quant_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] bf16/fp16 -> (fp8 e4m3 [M, K], fp32 scales [M, 1]) with x ~= q * scale."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    q = torch.empty((m, k), device=x2d.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=x2d.device, dtype=torch.float32)
    block_k = triton.next_power_of_2(k)
    # ~16K elements per program keeps enough bytes in flight per SM (K=3072 -> 4 rows).
    rows = max(1, min(16, 16384 // block_k))
    warps = 4 if block_k * rows <= 4096 else (8 if block_k * rows <= 8192 else 16)
    _act_quant_fp8_kernel[(triton.cdiv(m, rows),)](x2d, q, s, m, k, x2d.stride(0), q.stride(0),
                                                   BLOCK_K=block_k, ROWS=rows, num_warps=warps)
    return q, s


@triton.jit
def _decode(codes, scale):
    """E2M1 codes (int32) -> bf16 values times bf16 block scales (exact)."""
    e = (codes >> 1) & 3
    mant = codes & 1
    bits = tl.where(e > 0, ((e + 126) << 7) | (mant << 6), tl.where(mant == 1, 126 << 7, 0))
    bits = bits | ((codes & 8) << 12)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True) * scale


def _mm_configs():
    return [triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 128, 4, 4),
                                 (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 5), (16, 64, 4, 5)]]


def _prune(configs, named_args, **kwargs):
    m = named_args["M"]
    if m <= 32:
        return [c for c in configs if c.kwargs["BM"] <= 32]
    if m <= 256:
        return [c for c in configs if 32 <= c.kwargs["BM"] <= 64]
    return [c for c in configs if c.kwargs["BM"] >= 64]


@triton.autotune(configs=_mm_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_mm_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
                     stride_am, stride_wn, stride_sn, stride_cm,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    BK: tl.constexpr = 128
    H: tl.constexpr = 64
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, H)
    offs_s = tl.arange(0, 4)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a_lo = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_h)[None, :], mask=m_mask[:, None], other=0.0)
        a_hi = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + H + offs_h)[None, :], mask=m_mask[:, None], other=0.0)
        wq = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_h)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
        s_lo = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + offs_s)[None, :], mask=n_mask[:, None], other=0)
        s_hi = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + 4 + offs_s)[None, :], mask=n_mask[:, None], other=0)
        s_lo = tl.reshape(tl.broadcast_to(s_lo.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)[:, :, None], (BN, 4, 16)), (BN, H))
        s_hi = tl.reshape(tl.broadcast_to(s_hi.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)[:, :, None], (BN, 4, 16)), (BN, H))
        w_lo = _decode(wq & 0xF, s_lo)
        w_hi = _decode((wq >> 4) & 0xF, s_hi)
        acc = tl.dot(a_lo, tl.trans(w_lo), acc)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc)
    acc = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=[triton.Config({"BN": bn}, num_warps=w, num_stages=s)
                          for bn, w, s in [(16, 4, 4), (32, 4, 4), (64, 8, 3), (32, 8, 4)]],
                 key=["M", "N", "K"])
@triton.jit
def _w4a16_gemv_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M: tl.constexpr, N, K,
                       stride_am, stride_wn, stride_sn, stride_cm, HAS_BIAS: tl.constexpr, BN: tl.constexpr):
    """M <= 4 rows: each program owns BN output channels and streams their weights once."""
    H: tl.constexpr = 64
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, H)
    offs_s = tl.arange(0, 4)
    n_mask = offs_n < N
    acc0 = tl.zeros((BN,), dtype=tl.float32)
    acc1 = tl.zeros((BN,), dtype=tl.float32)
    acc2 = tl.zeros((BN,), dtype=tl.float32)
    acc3 = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, 128):
        wq = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_h)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
        s_lo = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + offs_s)[None, :], mask=n_mask[:, None], other=0)
        s_hi = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + 4 + offs_s)[None, :], mask=n_mask[:, None], other=0)
        s_lo = tl.reshape(tl.broadcast_to(s_lo.to(tl.float8e4nv, bitcast=True).to(tl.float32)[:, :, None], (BN, 4, 16)), (BN, H))
        s_hi = tl.reshape(tl.broadcast_to(s_hi.to(tl.float8e4nv, bitcast=True).to(tl.float32)[:, :, None], (BN, 4, 16)), (BN, H))
        w_lo = _decode(wq & 0xF, 1.0).to(tl.float32) * s_lo
        w_hi = _decode((wq >> 4) & 0xF, 1.0).to(tl.float32) * s_hi
        for r in tl.static_range(4):
            if r < M:
                x_lo = tl.load(a_ptr + r * stride_am + k0 + offs_h).to(tl.float32)
                x_hi = tl.load(a_ptr + r * stride_am + k0 + H + offs_h).to(tl.float32)
                part = tl.sum(w_lo * x_lo[None, :], axis=1) + tl.sum(w_hi * x_hi[None, :], axis=1)
                if r == 0:
                    acc0 += part
                elif r == 1:
                    acc1 += part
                elif r == 2:
                    acc2 += part
                else:
                    acc3 += part
    gs = tl.load(gs_ptr)
    b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    for r in tl.static_range(4):
        if r < M:
            acc = acc0 if r == 0 else (acc1 if r == 1 else (acc2 if r == 2 else acc3))
            tl.store(c_ptr + r * stride_cm + offs_n, (acc * gs + b).to(c_ptr.dtype.element_ty), mask=n_mask)


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def w4a16_gemm(x2d: torch.Tensor, split_packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] (any row stride, contiguous columns) = x2d @ dequant(W).T + bias.

    `split_packed` is split_half_pack(canonical packed); K must be a multiple of 128."""
    m, k = x2d.shape
    n = split_packed.shape[0]
    if k % KBLOCK:
        raise ValueError(f"w4a16 kernel needs K % {KBLOCK} == 0, got K={k}")
    if x2d.dtype != torch.bfloat16:
        x2d = x2d.to(torch.bfloat16)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    args = (x2d, split_packed, scale.view(torch.uint8), global_scale.reshape(1).float(),
            bias if bias is not None else x2d, out)
    if m <= 4:
        grid = lambda meta: (triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _w4a16_gemv_kernel[grid](*args, m, n, k, x2d.stride(0), split_packed.stride(0), scale.stride(0),
                                 out.stride(0), HAS_BIAS=bias is not None)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _w4a16_mm_kernel[grid](*args, m, n, k, _bucket(m), x2d.stride(0), split_packed.stride(0),
                               scale.stride(0), out.stride(0), HAS_BIAS=bias is not None)
    return out


@triton.autotune(configs=[triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                          for bn, bk, w, s in [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 8, 3), (32, 512, 8, 3)]],
                 key=["M", "N", "K"])
@triton.jit
def _fp8_gemv_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M: tl.constexpr, N, K,
                     stride_am, stride_wn, stride_cm, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """M <= 4 rows against FP8 weights with per-channel scales (the M=1 modulation GEMMs)."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_mask = offs_n < N
    acc0 = tl.zeros((BN,), dtype=tl.float32)
    acc1 = tl.zeros((BN,), dtype=tl.float32)
    acc2 = tl.zeros((BN,), dtype=tl.float32)
    acc3 = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_mask = (k0 + offs_k) < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        for r in tl.static_range(4):
            if r < M:
                x = tl.load(a_ptr + r * stride_am + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                part = tl.sum(w * x[None, :], axis=1)
                if r == 0:
                    acc0 += part
                elif r == 1:
                    acc1 += part
                elif r == 2:
                    acc2 += part
                else:
                    acc3 += part
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    for r in tl.static_range(4):
        if r < M:
            acc = acc0 if r == 0 else (acc1 if r == 1 else (acc2 if r == 2 else acc3))
            tl.store(c_ptr + r * stride_cm + offs_n, (acc * ws + b).to(c_ptr.dtype.element_ty), mask=n_mask)


def fp8_gemv(x2d: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    m, k = x2d.shape
    n = w8.shape[0]
    if m > 4:
        raise ValueError("fp8_gemv is for M <= 4")
    x2d = x2d.contiguous()
    out = torch.empty((m, n), device=x2d.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _fp8_gemv_kernel[grid](x2d, w8, ws, bias if bias is not None else x2d, out, m, n, k, x2d.stride(0),
                           w8.stride(0), out.stride(0), HAS_BIAS=bias is not None)
    return out
