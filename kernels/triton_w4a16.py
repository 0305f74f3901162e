"""w4a16 Triton kernels over the w4a16 layout (w4a16_layout): per row, 32-element chunks of four
32-bit words; nibble i of word w is element 4i + w of the chunk's scale group A (i < 4) or
element 4(i - 4) + w of its group B (i >= 4).

Decoding: `lane_pair` turns nibbles i and i + 4 of a word into two fp16 bit patterns with one
shift-and-mask per field (both halves of the word at once): ~2.5 integer ops per weight instead
of ~6 for a byte at a time; then a plain fp16 -> fp32 conversion.
small-M (M <= SMALL_M_MAX, e.g. the M=1 modulation GEMMs): y = x @ dequant(W).T + bias with the
  weight read once as 4-bit codes + e4m3 scales (0.56 bytes per weight instead of bf16's 2):
  fp32 FMAs for one row (a group's 16 products summed in registers, scaled once), tensor cores
  (rows padded to 16) for more, one product per lane pair so the decoded values never change
  layout (`_small_m_dot`). Split along K (fp32 partial sums added atomically) when N alone gives
  too few programs to fill the GPU.
decode: the layer's weight decoded to a transient bf16/fp16 [N, K] buffer in one pass (read
  0.56 B, write 2 B per weight), for cuBLAS to multiply at large M where the GEMM is
  compute-bound and a decoding GEMM loses (the in-kernel decode measured 0.27x bf16 at M=4096).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import e4m3_scale, row_tile
from .w4a16_layout import CHUNK

SMALL_M_MAX = 16
FMA_M_MAX = 4  # the FMA tiles hold at most this many rows in registers
BF16_SCALE_BIAS = tl.constexpr(2.0 ** 119)  # e4m3 block scale * 2^119 in bf16: see lane_pair_bf16


@triton.jit
def lane_bits(word, I: tl.constexpr, MAG: tl.constexpr):
    """uint32 words -> nibbles I (low half) and I + 4 (high half) placed as 16-bit float bit
    patterns: sign at bit 15, the nibble's 3 exponent/mantissa bits at MAG..MAG+2. Nibble I sits
    at bits 4I..4I+3 and nibble I + 4 sixteen bits higher, so one shift per field places both."""
    SHIFT: tl.constexpr = MAG - 4 * I
    MASK: tl.constexpr = (7 << MAG) * 0x10001
    if SHIFT >= 0:
        mag = (word << SHIFT) & MASK
    else:
        mag = (word >> -SHIFT) & MASK
    return mag | ((word << (12 - 4 * I)) & 0x80008000)


@triton.jit
def lane_pair(word, I: tl.constexpr):
    """uint32 words -> (nibble I, nibble I + 4) as fp32 e2m1 * 2^-14, exact.

    fp16 bits of e2m1 * 2^-14: the 3 exponent/mantissa bits at 11..9 (the e=0 codes land on fp16
    subnormals, which fp16 -> fp32 keeps)."""
    bits = lane_bits(word, I, 9)
    lo = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def lane_pair_bf16(word, I: tl.constexpr):
    """uint32 words -> (nibble I, nibble I + 4) as bf16 e2m1 * 2^-126, exact, for tensor cores.

    bf16 bits: the 3 exponent/mantissa bits at 8..6 (the e=0 codes land on bf16 subnormals): a
    bf16 multiply by the block scale * 2^119 then gives e2m1 * e4m3 * 2^-7 exactly (at most 6
    significant bits, at least 2^-17: a normal bf16), with no fp32 round trip."""
    bits = lane_bits(word, I, 6)
    lo = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    hi = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def chunk_values(word, s_a, s_b):
    """[BN, G, 4] words (G chunks) and their [BN, G] group scales (e4m3 * 2^14) -> the chunks'
    e2m1 * e4m3 values, exact, as [BN, G * 32] in K order.

    Nibble I of word w is element 4I + w of group A and nibble I + 4 element 4I + w of group B:
    the four lane pairs are joined into [BN, G, w, I % 2, I // 2, group] and permuted to
    [BN, G, group, I // 2, I % 2, w], which is K order."""
    a0, b0 = lane_pair(word, 0)
    a1, b1 = lane_pair(word, 1)
    a2, b2 = lane_pair(word, 2)
    a3, b3 = lane_pair(word, 3)
    sa = s_a[:, :, None]
    sb = s_b[:, :, None]
    ga = tl.join(tl.join(a0 * sa, a1 * sa), tl.join(a2 * sa, a3 * sa))
    gb = tl.join(tl.join(b0 * sb, b1 * sb), tl.join(b2 * sb, b3 * sb))
    v = tl.permute(tl.join(ga, gb), (0, 1, 5, 4, 3, 2))
    return tl.reshape(v, (word.shape[0], word.shape[1] * 32))


@triton.jit
def load_chunks(w_ptr, s_ptr, offs_n, c, ok, stride_wn, stride_sn):
    """Rows offs_n x chunks c (ok: [rows, chunks] mask) -> e2m1 * e4m3 values [rows, 32 x chunks]
    in K order (masked chunks read as zeros)."""
    word = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + c[None, :, None] * 4 + tl.arange(0, 4)[None, None, :],
                   mask=ok[:, :, None], other=0).to(tl.uint32, bitcast=True)
    s_row = s_ptr + offs_n[:, None] * stride_sn + 2 * c[None, :]
    return chunk_values(word, e4m3_scale(tl.load(s_row, mask=ok, other=0)),
                        e4m3_scale(tl.load(s_row + 1, mask=ok, other=0)))


@triton.jit
def _decode_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, n_chunks, stride_wn, stride_sn, stride_on,
                   BN: tl.constexpr, CB: tl.constexpr):
    """Program (n, b): BN rows x CB chunks, written as contiguous rows of CB * 32 elements."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    g = tl.arange(0, CB)
    c = tl.program_id(1) * CB + g
    v = load_chunks(w_ptr, s_ptr, offs_n, c, n_ok[:, None] & (c < n_chunks)[None, :], stride_wn, stride_sn)
    # (e2m1 * e4m3) * weight_scale_2, rounded once: the same value as nvfp4.dequantize
    v = (v * tl.load(gs_ptr)).to(out_ptr.dtype.element_ty)
    e = tl.program_id(1) * CB * 32 + tl.arange(0, CB * 32)
    tl.store(out_ptr + offs_n[:, None] * stride_on + e[None, :], v, mask=n_ok[:, None] & (e < n_chunks * 32)[None, :])


def _words(packed_w4a16: torch.Tensor) -> torch.Tensor:
    return packed_w4a16.view(torch.int32)


def decode(packed_w4a16: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Write dequant(W) into out [N, K] (bf16/fp16/fp32, contiguous columns, any row stride)."""
    n, half_k = packed_w4a16.shape
    k = half_k * 2
    if k % CHUNK or out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"decode: need K % {CHUNK} == 0 and out {n}x{k} with contiguous rows, "
                         f"got K={k}, out {tuple(out.shape)}")
    words = _words(packed_w4a16)
    bn, cb = 32, 4  # a program writes 32 rows x 128 elements
    _decode_kernel[(triton.cdiv(n, bn), triton.cdiv(k // CHUNK, cb))](
        words, scale.view(torch.uint8), global_scale.reshape(1).float(), out, n, k // CHUNK,
        words.stride(0), scale.stride(0), out.stride(0), BN=bn, CB=cb, num_warps=4)
    return out


# Every small-M tile the kernel has (G: chunks of 32 K elements per loop iteration; num_stages > 1
# lets Triton prefetch the next iteration's words while this one decodes). Tests run them all;
# choose() picks one per shape.
FMA_CONFIGS = [dict(BN=bn, G=g, DOT=False, num_warps=w, num_stages=st)
               for bn, g, w, st in [(8, 8, 2, 3), (8, 16, 2, 3), (16, 8, 4, 3), (16, 16, 4, 3), (32, 8, 4, 3),
                                    (16, 8, 4, 1), (32, 16, 8, 3)]]
# DOT tiles: G >= 4 (a lane pair's product runs over 4G K elements, the tensor cores take 16)
DOT_CONFIGS = [dict(BN=bn, G=g, DOT=True, num_warps=w, num_stages=st)
               for bn, g, w, st in [(64, 4, 4, 3), (32, 4, 4, 3), (64, 8, 4, 3), (32, 8, 4, 3), (64, 4, 4, 4),
                                    (128, 4, 8, 3), (16, 8, 4, 3)]]


def configs_for(m: int) -> list[dict]:
    """The tiles that can run M rows (FMA tiles hold the rows in registers: M <= FMA_M_MAX)."""
    return (FMA_CONFIGS if m <= FMA_M_MAX else []) + DOT_CONFIGS


@triton.jit
def _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, c_lo, c_hi, stride_am, stride_wn, stride_sn,
                 MP: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    """fp32 FMAs on [rows, BN, G chunks, 4 words] tiles: a thread holds whole chunks, so each
    group's 16 products are summed in its registers and scaled once."""
    rows = tl.arange(0, MP)
    g = tl.arange(0, G)
    t = tl.arange(0, 4)
    acc = tl.zeros((MP, BN, G), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, G):
        c = c0 + g
        c_ok = c < c_hi
        word = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + c[None, :, None] * 4 + t[None, None, :],
                       mask=n_mask[:, None, None] & c_ok[None, :, None], other=0).to(tl.uint32, bitcast=True)
        # activations addressed over the whole [rows, BN, G, 4] tile (offs_n * 0): each thread
        # loads the values it multiplies (L1 hits) instead of a broadcast through shared memory
        x = (a_ptr + rows[:, None, None, None] * stride_am + offs_n[None, :, None, None] * 0
             + c[None, None, :, None] * 32 + t[None, None, None, :])
        x_ok = (rows[:, None, None, None] < M) & c_ok[None, None, :, None]
        part_a = tl.zeros((MP, BN, G, 4), dtype=tl.float32)
        part_b = tl.zeros((MP, BN, G, 4), dtype=tl.float32)
        for i in tl.static_range(4):
            a, b = lane_pair(word, i)
            part_a += a[None, :, :, :] * tl.load(x + 4 * i, mask=x_ok, other=0.0).to(tl.float32)
            part_b += b[None, :, :, :] * tl.load(x + 16 + 4 * i, mask=x_ok, other=0.0).to(tl.float32)
        s_row = s_ptr + offs_n[:, None] * stride_sn + 2 * c[None, :]
        s_ok = n_mask[:, None] & c_ok[None, :]
        acc += (tl.sum(part_a, axis=3) * e4m3_scale(tl.load(s_row, mask=s_ok, other=0))[None, :, :]
                + tl.sum(part_b, axis=3) * e4m3_scale(tl.load(s_row + 1, mask=s_ok, other=0))[None, :, :])
    return tl.sum(acc, axis=2), rows


@triton.jit
def _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, c_lo, c_hi, stride_am, stride_wn, stride_sn,
                 BN: tl.constexpr, G: tl.constexpr):
    """Tensor cores, rows padded to 16, without reordering the weight into K order.

    The words of G chunks are one [4G, BN] tile (row r: word r % 4 of chunk r // 4). Its lane
    pair I holds element 4I + w of every chunk's group A and group B, so `x @ W.T` over these G
    chunks is the sum of 8 products [16, 4G] x [4G, BN], one per (I, group), each with the
    activations gathered in the same order. The decode is elementwise on the loaded tile, so
    Triton gives the tile the tensor cores' operand layout from the start (no shared-memory
    shuffle of decoded values, which made the K-ordered version 0.6-0.8x bf16 at M=16)."""
    rows = tl.arange(0, 16)
    r_ok = rows < M
    r = tl.arange(0, 4 * G)
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, G):
        c = c0 + r // 4
        c_ok = c < c_hi
        ok = c_ok[:, None] & n_mask[None, :]
        word = tl.load(w_ptr + offs_n[None, :] * stride_wn + c0 * 4 + r[:, None], mask=ok,
                       other=0).to(tl.uint32, bitcast=True)
        s_row = s_ptr + offs_n[None, :] * stride_sn + 2 * c[:, None]
        s_a = e4m3_scale(tl.load(s_row, mask=ok, other=0), BF16_SCALE_BIAS).to(tl.bfloat16)
        s_b = e4m3_scale(tl.load(s_row + 1, mask=ok, other=0), BF16_SCALE_BIAS).to(tl.bfloat16)
        x = a_ptr + rows[:, None] * stride_am + c[None, :] * 32 + (r % 4)[None, :]
        x_ok = r_ok[:, None] & c_ok[None, :]
        for i in tl.static_range(4):
            a, b = lane_pair_bf16(word, i)
            acc = tl.dot(tl.load(x + 4 * i, mask=x_ok, other=0.0), a * s_a, acc)
            acc = tl.dot(tl.load(x + 16 + 4 * i, mask=x_ok, other=0.0), b * s_b, acc)
    return acc * 128.0, rows  # the products were e2m1 * e4m3 * 2^-7


@triton.jit
def _small_m_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                    stride_cm, HAS_BIAS: tl.constexpr, MP: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                    G: tl.constexpr, DOT: tl.constexpr):
    """Program (n, s) owns BN output channels and the s-th of SPLIT K ranges, and streams those
    4-bit weights once. SPLIT > 1 adds fp32 partial sums atomically into a zeroed c."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    n_chunks = K // 32
    per = tl.cdiv(n_chunks, SPLIT)
    c_lo = pid_k * per
    c_hi = tl.minimum(c_lo + per, n_chunks)
    if DOT:
        acc, rows = _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, c_lo, c_hi, stride_am, stride_wn,
                                 stride_sn, BN, G)
    else:
        acc, rows = _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, c_lo, c_hi, stride_am, stride_wn,
                                 stride_sn, MP, BN, G)
    acc = acc * tl.load(gs_ptr)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]  # once, by the first K range
    dst = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    ok = (rows[:, None] < M) & n_mask[None, :]
    if SPLIT == 1:
        tl.store(dst, acc.to(c_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(dst, acc, mask=ok)


def split_for(n: int, k: int, sms: int) -> int:
    """K ranges per output tile: enough programs for ~2 per SM at the widest tile (BN=64) when N
    alone gives fewer, each range keeping at least 64 chunks (2048 K elements; on the H100 a
    split of K=3072 lost to one range, one of K=12288 into 5 won 1.4x)."""
    return max(1, min(2 * sms // triton.cdiv(n, 64), k // CHUNK // 64, 8))


def dot_split_for(n: int, k: int, sms: int) -> int:
    """K ranges for the tensor-core tiles: as split_for, but at least 2 where each range keeps 32
    chunks (on the H100 2 ranges of K=3072 won 4-10% over one at every N measured, 3072-18432)."""
    return max(split_for(n, k, sms), min(2, k // CHUNK // 32))


def choose(m: int, n: int, k: int, sms: int) -> tuple[dict, int]:
    """The tile and K split for this shape, fixed from H100 timings of every tile (BENCHMARKS.md)
    rather than by Triton's autotuner: for these few-microsecond kernels its picks differed
    between runs on the same card (1.5-3x apart), and its per-call bookkeeping costs host time.
    One row: FMAs (1.3-2.3x bf16, the tensor-core tile 0.9-1.8x); two rows or more: tensor cores
    (at M=4 the FMA tiles measured 0.4-0.5x bf16, the tensor-core tile 0.9-1.7x)."""
    if m == 1:
        return dict(BN=16, G=16, DOT=False, num_warps=4, num_stages=3), split_for(n, k, sms)
    bn = 32 if n <= 4096 and k <= 4096 else 64
    return dict(BN=bn, G=4, DOT=True, num_warps=4, num_stages=3), dot_split_for(n, k, sms)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count  # once per device, not per call


def small_m_gemm(x2d: torch.Tensor, packed_w4a16: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None,
                 split: int | None = None) -> torch.Tensor:
    """out[M, N] (contiguous columns, any row stride) = x2d @ dequant(W).T + bias, M <= 16.
    config/split: one of configs_for(M) and a K split (tests, benchmarks); default: choose()."""
    m, k = x2d.shape
    n = packed_w4a16.shape[0]
    if k % CHUNK or m > SMALL_M_MAX:
        raise ValueError(f"small_m_gemm: need K % {CHUNK} == 0 and M <= {SMALL_M_MAX}, got M={m}, K={k}")
    if config is None or split is None:
        picked, picked_split = choose(m, n, k, _sm_count(x2d.device) if x2d.is_cuda else 1)
        config = picked if config is None else config
        split = picked_split if split is None else split
    x2d = x2d.to(torch.bfloat16).contiguous()
    words = _words(packed_w4a16)
    target = out if split == 1 else torch.zeros((m, n), device=out.device, dtype=torch.float32)
    _small_m_kernel[(triton.cdiv(n, config["BN"]), split)](
        x2d, words, scale.view(torch.uint8), global_scale.reshape(1).float(), bias if bias is not None else x2d,
        target, m, n, k, x2d.stride(0), words.stride(0), scale.stride(0), target.stride(0),
        HAS_BIAS=bias is not None, MP=row_tile(m), SPLIT=split, **config)
    if target is not out:
        out.copy_(target)
    return out
