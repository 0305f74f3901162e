"""Triton kernels of the fp8 backend.

act_quant_fp8: per-token FP8 e4m3 quantization in ONE pass (each row read once: the row's amax
  and the scaled cast come from the same registers).
small_m_gemm: M <= 16 rows against FP8 weights with per-channel scales (the M=1 modulation GEMMs):
  streams the weight once with bf16 activations; cuBLAS's FP8 GEMM is slow there.
nvfp4_to_fp8: preparation. Per row: decode NVFP4, take amax, pick the best of SCALE_CANDIDATES
  (smallest squared rounding error), write e4m3 + the fp32 row scale. One launch per part; the
  same arithmetic as hopper.fp8_weight (the torch reference), in a fraction of the memory traffic.
preparation_launches: the variants preparing a model's layers runs, built on meta tensors by the
  same functions the calls use, for compile_ahead.TritonKernelsAhead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (LayerShape, Launch, cdiv, configs_for, direct, e4m3_scale, fp4_pair, fp8_codes,
                            fp8_row_scale, launch, next_pow2, row_tile)

SMALL_M_MAX = 16  # M up to this runs small_m_gemm


@triton.jit
def _act_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = fp8_row_scale(tl.max(tl.abs(x), axis=1))
    q = fp8_codes(x, scale[:, None], q_ptr)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < M)


def act_quant_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] bf16/fp16 -> (fp8 e4m3 [M, K], fp32 scales [M, 1]) with x ~= q * scale."""
    q, s, lc = _act_quant_launch(x2d)
    direct(_act_quant_fp8_kernel)(lc.grid, lc.args, lc.options)
    return q, s


def _act_quant_launch(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Launch]:
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    q = torch.empty((m, k), device=x2d.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=x2d.device, dtype=torch.float32)
    block_k = next_pow2(k)
    # ~16K elements per program keeps enough bytes in flight per SM (K=3072 -> 4 rows).
    rows = max(1, min(16, 16384 // block_k))
    warps = 4 if block_k * rows <= 4096 else (8 if block_k * rows <= 8192 else 16)
    return q, s, Launch(_act_quant_fp8_kernel, (cdiv(m, rows),), (x2d, q, s, m, k, x2d.stride(0), q.stride(0)),
                        dict(BLOCK_K=block_k, ROWS=rows, num_warps=warps))


def _small_configs():
    return [triton.Config({"BN": bn, "BK": bk, "DOT": dot}, num_warps=w, num_stages=s)
            for bn, bk, dot, w, s in [(16, 256, False, 4, 4), (32, 256, False, 4, 4), (64, 128, False, 8, 3),
                                      (32, 512, False, 8, 3), (16, 128, False, 4, 4), (32, 128, False, 8, 3),
                                      (32, 128, True, 4, 4), (64, 128, True, 4, 3), (64, 256, True, 8, 3)]]


def _prune_small(configs, named_args, **kwargs):
    mp = kwargs.get("MP", named_args.get("MP"))
    return [c for c in configs if c.kwargs["DOT"] or mp * c.kwargs["BN"] * c.kwargs["BK"] <= 2048 * c.num_warps]


@triton.jit
def _small_m_acc(a_ptr, w_ptr, offs_n, n_mask, M, K, stride_am, stride_wn,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    rows = tl.arange(0, BM)
    r_mask = rows < M
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_mask = (k0 + offs_k) < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT:  # e4m3 values are exact in bf16
            acc = tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc, rows, r_mask


def _quick_bench(kernel_call, quantiles):
    """The autotuner's timer, shortened (5 ms warm-up, 20 ms of calls per config instead of
    25 + 100): these kernels take microseconds, and every new (N, K, rows) shape is tuned on its
    first call, inside the first sampling step."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@triton.autotune(configs=_small_configs(), key=["N", "K", "MP"], prune_configs_by={"early_config_prune": _prune_small},
                 do_bench=_quick_bench)
@triton.jit
def _small_m_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                    HAS_BIAS: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    DOT: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    if DOT:
        acc, rows, r_mask = _small_m_acc(a_ptr, w_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, 16, BN, BK, True)
    else:
        acc, rows, r_mask = _small_m_acc(a_ptr, w_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, MP, BN, BK, False)
    acc = acc * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


def small_m_gemm(x2d: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    out, grid, args, kwargs = _small_m_call(x2d, w8, ws, bias, out_dtype)
    launch(_small_m_kernel, grid, args, kwargs, config)
    return out


def _small_m_call(x2d, w8, ws, bias, out_dtype):
    """small_m_gemm's output, grid, arguments and keys (the autotuner picks the rest)."""
    m, k = x2d.shape
    n = w8.shape[0]
    if m > SMALL_M_MAX:
        raise ValueError(f"fp8 small_m_gemm is for M <= {SMALL_M_MAX}, got {m}")
    x2d = x2d.contiguous()
    out = torch.empty((m, n), device=x2d.device, dtype=out_dtype)
    grid = lambda meta: (cdiv(n, meta["BN"]),)  # noqa: E731
    return out, grid, (x2d, w8, ws, bias if bias is not None else x2d, out, m, n, k, x2d.stride(0), w8.stride(0),
                       out.stride(0)), dict(HAS_BIAS=bias is not None, MP=row_tile(m))


@triton.jit
def _decoded_chunk(w_ptr, s_ptr, gs, row, c0, half_k, stride_wn, stride_sn, BB: tl.constexpr):
    """Bytes [c0, c0 + BB) of a canonical row -> (even elements, odd elements) in fp32, exactly
    nvfp4.dequantize's (e2m1 * e4m3) * weight_scale_2; out-of-row lanes are 0."""
    j = c0 + tl.arange(0, BB)
    ok = j < half_k
    byte = tl.load(w_ptr + row * stride_wn + j, mask=ok, other=0).to(tl.int32)
    s = e4m3_scale(tl.load(s_ptr + row * stride_sn + j // 8, mask=ok, other=0))  # 16 elements = 8 bytes
    lo, hi = fp4_pair(byte)
    return (lo * s) * gs, (hi * s) * gs


@triton.jit
def _candidate_errors(w, cand):
    """Squared e4m3 rounding error of w under each candidate scale: [8]."""
    q = tl.clamp(tl.math.div_rn(w[None, :], cand[:, None]), -448.0, 448.0).to(tl.float8e4nv)
    e = q.to(tl.float32) * cand[:, None] - w[None, :]
    return tl.sum(e * e, axis=1)


@triton.jit
def _nvfp4_to_fp8_kernel(w_ptr, s_ptr, gs_ptr, q_ptr, qs_ptr, half_k, stride_wn, stride_sn, stride_qn,
                         BB: tl.constexpr):
    row = tl.program_id(0)
    gs = tl.load(gs_ptr)
    amax = tl.zeros((BB,), dtype=tl.float32)
    for c0 in range(0, half_k, BB):
        lo, hi = _decoded_chunk(w_ptr, s_ptr, gs, row, c0, half_k, stride_wn, stride_sn, BB)
        amax = tl.maximum(amax, tl.maximum(tl.abs(lo), tl.abs(hi)))
    amax_row = tl.max(amax, axis=0)
    base = tl.where(amax_row > 0, tl.math.div_rn(amax_row, 448.0), 1.0)
    ratio = 1.0 - tl.arange(0, 8).to(tl.float32) * 0.0625  # hopper.SCALE_CANDIDATES, exactly
    cand = base * ratio  # [8], the fp32 products torch forms
    err = tl.zeros((8,), dtype=tl.float32)
    for c0 in range(0, half_k, BB):
        lo, hi = _decoded_chunk(w_ptr, s_ptr, gs, row, c0, half_k, stride_wn, stride_sn, BB)
        err += _candidate_errors(lo, cand) + _candidate_errors(hi, cand)
    best = tl.argmin(err, axis=0)  # first minimum, like the reference's strict '<'
    s = tl.sum(tl.where(tl.arange(0, 8) == best, cand, 0.0), axis=0)
    for c0 in range(0, half_k, BB):
        lo, hi = _decoded_chunk(w_ptr, s_ptr, gs, row, c0, half_k, stride_wn, stride_sn, BB)
        q_lo = tl.clamp(tl.math.div_rn(lo, s), -448.0, 448.0).to(tl.float8e4nv)
        q_hi = tl.clamp(tl.math.div_rn(hi, s), -448.0, 448.0).to(tl.float8e4nv)
        j = c0 + tl.arange(0, BB)
        tl.store(q_ptr + row * stride_qn + 2 * j, q_lo, mask=j < half_k)
        tl.store(q_ptr + row * stride_qn + 2 * j + 1, q_hi, mask=j < half_k)
    tl.store(qs_ptr + row, s)


def nvfp4_to_fp8(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                 q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Canonical NVFP4 [N, K/2] on the GPU -> e4m3 q_out [N, K] and fp32 scale_out [N]."""
    n, half_k = packed.shape
    if q_out.shape != (n, 2 * half_k) or q_out.stride(1) != 1 or scale_out.shape != (n,):
        raise ValueError(f"nvfp4_to_fp8: outputs must be [{n}, {2 * half_k}] and [{n}]")
    lc = _to_fp8_launch(packed, block_scale, global_scale, q_out, scale_out)
    _nvfp4_to_fp8_kernel[lc.grid](*lc.args, **lc.options)


def _to_fp8_launch(packed, block_scale, global_scale, q_out, scale_out) -> Launch:
    n, half_k = packed.shape
    return Launch(_nvfp4_to_fp8_kernel, (n,), (packed, block_scale.view(torch.uint8), global_scale.reshape(1).float(),
                                              q_out, scale_out, half_k, packed.stride(0), block_scale.stride(0),
                                              q_out.stride(0)), dict(BB=256, num_warps=4))


def preparation_launches(layer: LayerShape, check_rows: int) -> list[Launch]:
    """The launches preparing a layer of this shape makes (the conversion per part) and its
    self-check (bf16: the activation quantization at `check_rows` rows before torch._scaled_mm,
    where that takes the shape; the small-M GEMV at one row, on the config the check runs
    untuned), on meta tensors (for compile_ahead.TritonKernelsAhead)."""
    meta = dict(device="meta")
    n_total, k = sum(layer.rows), layer.k
    q = torch.empty((n_total, k), dtype=torch.float8_e4m3fn, **meta)
    scale = torch.empty(n_total, dtype=torch.float32, **meta)
    gscale = torch.empty((), dtype=torch.float32, **meta)
    launches, start = [], 0
    for n in layer.rows:
        launches.append(_to_fp8_launch(torch.empty((n, k // 2), dtype=torch.uint8, **meta),
                                       torch.empty((n, k // 16), dtype=torch.float8_e4m3fn, **meta), gscale,
                                       q[start:start + n], scale[start:start + n]))
        start += n
    from .hopper import scaled_mm_shape_ok
    if scaled_mm_shape_ok(n_total, k):  # else that check runs fp8-dq: nothing to quantize
        launches.append(_act_quant_launch(torch.empty((check_rows, k), dtype=torch.bfloat16, **meta))[2])
    bias = torch.empty(n_total, dtype=torch.bfloat16, **meta) if layer.has_bias else None
    _, _, args, keys = _small_m_call(torch.empty((1, k), dtype=torch.bfloat16, **meta), q, scale, bias, torch.bfloat16)
    config = configs_for(_small_m_kernel, **keys)[0]  # what triton_common.launch runs untuned
    launches.append(Launch(_small_m_kernel.fn, (triton.cdiv(n_total, config["BN"]),), args, {**keys, **config}))
    return launches

