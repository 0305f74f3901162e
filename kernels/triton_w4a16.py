"""w4a16 Triton kernels over the split-half layout (see w4a16_layout: byte j of each 128-wide K
block holds elements j and j + 64, so a byte's two nibbles feed two 64-wide K halves).

small-M (M <= SMALL_M_MAX, e.g. the M=1 modulation GEMMs): y = x @ dequant(W).T + bias with the
  weight read once as 4-bit codes + e4m3 scales and decoded in registers. Memory-bound work: the
  kernel streams 0.56 bytes per weight instead of bf16's 2.
decode: the layer's weight decoded to a transient bf16/fp16 [N, K] buffer in one pass (read
  0.56 B, write 2 B per weight), for cuBLAS to multiply at large M where the GEMM is
  compute-bound and a decoding GEMM loses (the in-kernel decode measured 0.27x bf16 at M=4096).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import e4m3_scale, fp4_pair, launch, row_tile
from .w4a16_layout import KBLOCK

SMALL_M_MAX = 16


@triton.jit
def _load_block(w_ptr, s_ptr, offs_n, n_mask, kb, stride_wn, stride_sn, BN: tl.constexpr):
    """One 128-wide K block of BN rows -> (low half, high half) as fp32 [BN, 64] e2m1 * e4m3."""
    g = tl.arange(0, 4)
    i = tl.arange(0, 16)
    byte = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + kb * 64 + g[None, :, None] * 16 + i[None, None, :],
                   mask=n_mask[:, None, None], other=0).to(tl.int32)
    s_row = s_ptr + offs_n[:, None] * stride_sn + kb * 8 + g[None, :]
    s_lo = e4m3_scale(tl.load(s_row, mask=n_mask[:, None], other=0))
    s_hi = e4m3_scale(tl.load(s_row + 4, mask=n_mask[:, None], other=0))
    v_lo, v_hi = fp4_pair(byte)
    return (tl.reshape(v_lo * s_lo[:, :, None], (BN, 64)), tl.reshape(v_hi * s_hi[:, :, None], (BN, 64)))


@triton.jit
def _decode_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, stride_wn, stride_sn, stride_on, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    gs = tl.load(gs_ptr)
    lo, hi = _load_block(w_ptr, s_ptr, offs_n, n_mask, kb, stride_wn, stride_sn, BN)
    h = tl.arange(0, 64)
    dst = out_ptr + offs_n[:, None] * stride_on + kb * 128 + h[None, :]
    ty = out_ptr.dtype.element_ty
    # (e2m1 * e4m3) * weight_scale_2, rounded once: the same value as nvfp4.dequantize
    tl.store(dst, (lo * gs).to(ty), mask=n_mask[:, None])
    tl.store(dst + 64, (hi * gs).to(ty), mask=n_mask[:, None])


def decode(split_packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Write dequant(W) into out [N, K] (bf16/fp16/fp32, contiguous columns, any row stride)."""
    n, half_k = split_packed.shape
    k = half_k * 2
    if k % KBLOCK or out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"decode: need K % {KBLOCK} == 0 and out {n}x{k} with contiguous rows, "
                         f"got K={k}, out {tuple(out.shape)}")
    bn = 32
    _decode_kernel[(triton.cdiv(n, bn), k // KBLOCK)](
        split_packed, scale.view(torch.uint8), global_scale.reshape(1).float(), out, n,
        split_packed.stride(0), scale.stride(0), out.stride(0), BN=bn, num_warps=4)
    return out


def _small_configs():
    # U: 128-wide K blocks per loop iteration. Nothing pipelines these loads (they feed FMAs,
    # not tl.dot), so the bytes in flight per SM come from the tile: U blocks at once.
    return [triton.Config({"BN": bn, "U": u, "DOT": dot}, num_warps=w, num_stages=s)
            for bn, u, dot, w, s in [(16, 4, False, 4, 1), (32, 2, False, 4, 1), (32, 4, False, 4, 1),
                                     (64, 2, False, 8, 1), (16, 2, True, 4, 3), (32, 2, True, 4, 3),
                                     (64, 1, True, 4, 3), (32, 4, True, 8, 3)]]


def _prune_small(configs, named_args, **kwargs):
    mp = kwargs.get("MP", named_args.get("MP"))
    # FMA tiles are only worth it for a few rows; tensor-core tiles pad the rows to 16
    return [c for c in configs if c.kwargs["DOT"] or mp <= 4]


@triton.jit
def _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, stride_sn,
                 MP: tl.constexpr, BN: tl.constexpr, U: tl.constexpr):
    """fp32 FMAs on [BN, 4U groups, 16] tiles: no reshape, and the block scale multiplies each
    group's 16-element partial sum instead of every weight."""
    rows = tl.arange(0, MP)
    g = tl.arange(0, 4 * U)  # group g: block g // 4, 16-byte group g % 4 of that block
    i = tl.arange(0, 16)
    n_blocks = K // 128
    acc = tl.zeros((MP, BN), dtype=tl.float32)
    for kb in range(0, n_blocks, U):
        g_ok = (kb + g // 4) < n_blocks
        byte = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + kb * 64 + g[None, :, None] * 16 + i[None, None, :],
                       mask=n_mask[:, None, None] & g_ok[None, :, None], other=0).to(tl.int32)
        s_row = s_ptr + offs_n[:, None] * stride_sn + (kb + g[None, :] // 4) * 8 + g[None, :] % 4
        s_lo = e4m3_scale(tl.load(s_row, mask=n_mask[:, None] & g_ok[None, :], other=0))
        s_hi = e4m3_scale(tl.load(s_row + 4, mask=n_mask[:, None] & g_ok[None, :], other=0))
        v_lo, v_hi = fp4_pair(byte)
        x_off = (kb + g[:, None] // 4) * 128 + (g[:, None] % 4) * 16 + i[None, :]  # low-nibble elements
        for r in tl.static_range(MP):
            r_ok = ((tl.zeros((4 * U, 16), dtype=tl.int32) + r) < M) & g_ok[:, None]
            x_lo = tl.load(a_ptr + r * stride_am + x_off, mask=r_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(a_ptr + r * stride_am + x_off + 64, mask=r_ok, other=0.0).to(tl.float32)
            part = (tl.sum(tl.sum(v_lo * x_lo[None, :, :], axis=2) * s_lo, axis=1)
                    + tl.sum(tl.sum(v_hi * x_hi[None, :, :], axis=2) * s_hi, axis=1))
            acc += tl.where(rows[:, None] == r, part[None, :], 0.0)
    return acc, rows


@triton.jit
def _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, stride_sn,
                 BN: tl.constexpr, U: tl.constexpr):
    """Tensor cores, one 16-wide scale group at a time (rows padded to 16): each group's
    [16, 16] x [16, BN] product is scaled per output channel as it is accumulated (the same
    16 x BN multiplies as scaling the weights, and no reshape)."""
    rows = tl.arange(0, 16)
    r_mask = rows < M
    i = tl.arange(0, 16)
    n_blocks = K // 128
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for kb0 in range(0, n_blocks, U):
        for u in tl.static_range(U):
            kb = kb0 + u
            ok = kb < n_blocks
            for g in tl.static_range(4):
                byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + kb * 64 + g * 16 + i[None, :],
                               mask=n_mask[:, None] & ok, other=0).to(tl.int32)
                s_lo = e4m3_scale(tl.load(s_ptr + offs_n * stride_sn + kb * 8 + g, mask=n_mask & ok, other=0))
                s_hi = e4m3_scale(tl.load(s_ptr + offs_n * stride_sn + kb * 8 + 4 + g, mask=n_mask & ok, other=0))
                v_lo, v_hi = fp4_pair(byte)  # e2m1 * 2^-14: exact in bf16
                x_row = a_ptr + rows[:, None] * stride_am + kb * 128 + g * 16 + i[None, :]
                x_lo = tl.load(x_row, mask=r_mask[:, None] & ok, other=0.0)
                x_hi = tl.load(x_row + 64, mask=r_mask[:, None] & ok, other=0.0)
                acc += tl.dot(x_lo, tl.trans(v_lo.to(tl.bfloat16))) * s_lo[None, :]
                acc += tl.dot(x_hi, tl.trans(v_hi.to(tl.bfloat16))) * s_hi[None, :]
    return acc, rows


@triton.autotune(configs=_small_configs(), key=["N", "K", "MP"], prune_configs_by={"early_config_prune": _prune_small})
@triton.jit
def _small_m_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                    stride_cm, HAS_BIAS: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
                    DOT: tl.constexpr):
    """Each program owns BN output channels and streams their 4-bit weights once."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    if DOT:
        acc, rows = _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, stride_sn, BN, U)
    else:
        acc, rows = _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, K, stride_am, stride_wn, stride_sn, MP, BN,
                                 U)
    acc = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & n_mask[None, :])


def small_m_gemm(x2d: torch.Tensor, split_packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """out[M, N] (contiguous columns, any row stride) = x2d @ dequant(W).T + bias, M <= 16."""
    m, k = x2d.shape
    n = split_packed.shape[0]
    if k % KBLOCK or m > SMALL_M_MAX:
        raise ValueError(f"small_m_gemm: need K % {KBLOCK} == 0 and M <= {SMALL_M_MAX}, got M={m}, K={k}")
    x2d = x2d.to(torch.bfloat16).contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BN"]),)  # noqa: E731
    launch(_small_m_kernel, grid, (x2d, split_packed, scale.view(torch.uint8), global_scale.reshape(1).float(),
                                   bias if bias is not None else x2d, out, m, n, k, x2d.stride(0),
                                   split_packed.stride(0), scale.stride(0), out.stride(0)),
           dict(HAS_BIAS=bias is not None, MP=row_tile(m)), config)
    return out
