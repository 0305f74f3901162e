"""Triton kernels for GPUs without FP4 tensor cores (imported only when such a backend runs).

act_quant_fp8: per-token FP8 e4m3 quantization in ONE pass (each row read once: the row's amax
  and the scaled cast come from the same registers).
w4a16_gemm: y = x @ dequant(W).T with W read as packed E2M1 codes + e4m3 block scales. Codes
  are decoded by building the bf16 bit pattern directly; e2m1 * e4m3 is exact in bf16, so the
  only rounding before the fp32 accumulator is none; weight_scale_2 is applied to the
  accumulator at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


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
    rows = max(1, min(16, 4096 // block_k))
    warps = 4 if block_k * rows <= 4096 else (8 if block_k * rows <= 8192 else 16)
    _act_quant_fp8_kernel[(triton.cdiv(m, rows),)](x2d, q, s, m, k, x2d.stride(0), q.stride(0),
                                                   BLOCK_K=block_k, ROWS=rows, num_warps=warps)
    return q, s


def _w4a16_configs():
    cfgs = []
    for bm, bn, bk, w, s in [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 4),
                             (64, 128, 128, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                             (128, 128, 128, 8, 3)]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


def _prune(configs, named_args, **kwargs):
    m = named_args["M"]
    small = [c for c in configs if c.kwargs["BM"] <= 32]
    large = [c for c in configs if c.kwargs["BM"] >= 64]
    return small if m <= 32 else (large if m >= 256 else configs)


@triton.autotune(configs=_w4a16_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
                  stride_am, stride_wn, stride_sn, stride_cm,
                  HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  GROUP_M: tl.constexpr):
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
    offs_k = tl.arange(0, BK)
    offs_kh = tl.arange(0, BK // 2)
    offs_ks = tl.arange(0, BK // 16)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=m_mask[:, None] & ((k0 + offs_k)[None, :] < K), other=0.0)
        wq = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_kh)[None, :],
                     mask=n_mask[:, None] & ((k0 // 2 + offs_kh)[None, :] < K // 2), other=0).to(tl.int32)
        sc = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 16 + offs_ks)[None, :],
                     mask=n_mask[:, None] & ((k0 // 16 + offs_ks)[None, :] < K // 16), other=0)
        codes = tl.reshape(tl.join(wq & 0xF, (wq >> 4) & 0xF), (BN, BK))  # element 2i = low nibble
        e = (codes >> 1) & 3
        mant = codes & 1
        bits = tl.where(e > 0, ((e + 126) << 7) | (mant << 6), tl.where(mant == 1, 126 << 7, 0))
        bits = bits | ((codes & 8) << 12)  # sign
        vals = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        scale = sc.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        w = tl.reshape(tl.reshape(vals, (BN, BK // 16, 16)) * scale[:, :, None], (BN, BK))
        acc = tl.dot(a.to(tl.bfloat16), tl.trans(w), acc)
    acc = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def w4a16_gemm(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] (any row stride, contiguous columns) = x2d @ dequant(W).T + bias."""
    m, k = x2d.shape
    n = packed.shape[0]
    if x2d.dtype != torch.bfloat16:
        x2d = x2d.to(torch.bfloat16)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _w4a16_kernel[grid](x2d, packed, scale.view(torch.uint8), global_scale.reshape(1).float(),
                        bias if bias is not None else x2d, out, m, n, k, _bucket(m),
                        x2d.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
                        HAS_BIAS=bias is not None)
    return out
