"""w4a16 Triton kernels over the w4a16 layout (w4a16_layout): 128-element superchunks of sixteen
32-bit words, nibble I of word w = element 16 I + w (scale group I), stored 32 rows at a time.

small-M (M <= SMALL_M_MAX: the modulation GEMMs at batch M, the time/guidance/vector MLPs):
  y = x @ dequant(W).T + bias with the weight read once as 4-bit codes + e4m3 scales (0.56 bytes
  per weight instead of bf16's 2).
  - Two rows or more (and one where measured faster): tensor cores. Nibble I of a [16 words, BN
    rows] tile is one scale group of each row, so its product with the activations' 16 matching
    columns is one tensor-core dot, scaled per output channel afterwards. The nibble-to-bf16
    decode is one pure inline-PTX function of the loaded words (`lane_bf16`), which lets Triton
    load the words from its pipelined shared-memory buffer straight into the dot-operand layout
    and decode there: no shared-memory round trip of decoded weights (the kernel this replaces
    decoded in a plain layout and converted 8 tiles per iteration through shared memory).
  - One row: fp32 FMAs, each thread holding whole 16-byte quarters of a superchunk row.
  Split along K (fp32 partial sums added atomically) when N alone gives too few programs.
decode: the layer's weight decoded to a transient bf16/fp16 [N, K] buffer in one pass (read
  0.56 B, write 2 B per weight), for cuBLAS to multiply at large M where the GEMM is
  compute-bound and a decoding GEMM loses (the in-kernel decode measured 0.27x bf16 at M=4096).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import e4m3_scale
from .w4a16_layout import SUPER, TILE_ROWS, padded_rows

SMALL_M_MAX = 16
# the layout's sizes as constants the kernels can read
SUPER_K = tl.constexpr(SUPER)
TILE_R = tl.constexpr(TILE_ROWS)
TILE_WORDS = tl.constexpr(TILE_ROWS * 16)  # int32 words of one stored tile of one superchunk


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
def lane_bf16(word, I: tl.constexpr):
    """uint32 words -> nibble I of each as bf16 e2m1, exact: one pure inline-PTX function of the
    words (two per call), which Triton may evaluate in the tensor cores' operand layout.

    prmt gathers the byte holding nibble I of both words; its 3 magnitude bits go to bf16 bits
    6..8 and its sign to bit 15 (e2m1 * 2^-126: the e=0 codes are bf16 subnormals), and one
    bf16x2 multiply by 2^126 (0x7E80) makes them normal."""
    Q: tl.constexpr = I // 2
    SEL: tl.constexpr = Q | ((Q + 4) << 8)  # byte Q of the first word -> byte 0, of the second -> byte 2
    SM: tl.constexpr = 6 - 4 * (I % 2)
    SS: tl.constexpr = 12 - 4 * (I % 2)
    return tl.inline_asm_elementwise(
        asm=f"""{{ .reg .b32 t, m, s, c, z;
        prmt.b32 t, $1, $2, {SEL};
        shl.b32 m, t, {SM};
        and.b32 m, m, 0x01C001C0;
        shl.b32 s, t, {SS};
        and.b32 s, s, 0x80008000;
        or.b32 m, m, s;
        mov.b32 c, 0x7E807E80;
        mov.b32 z, 0x80008000;
        fma.rn.bf16x2 $0, m, c, z;
        }}""",
        constraints="=r,r,r", args=[word], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def lane_f32(word, I: tl.constexpr):
    """lane_bf16's values through fp32 and plain Triton ops, for the CPU interpreter (which runs
    no inline PTX and has no bf16 matmul): the 3 bits at fp32 22..24 are e2m1 * 2^-126."""
    bits = (((word >> (4 * I)) & 7) << 22) | (((word >> (4 * I + 3)) & 1) << 31)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126


@triton.jit
def group_scale(s8, I: tl.constexpr, FACTOR: tl.constexpr = 1.0):
    """uint64 holding a superchunk's 8 e4m3 block scales (its groups in order) -> fp32 scale of
    group I * FACTOR (a power of two: exact)."""
    return e4m3_scale(((s8 >> (8 * I)) & 0xFF).to(tl.uint8), FACTOR)


@triton.jit
def word_offsets(offs_n, n_sc):
    """Rows -> int32 offset of word 0 of their superchunk 0 (add superchunk * TILE_WORDS)."""
    return (offs_n // TILE_R) * (n_sc * TILE_WORDS) + (offs_n % TILE_R) * 16


@triton.jit
def scale_words(s_ptr, offs_n, stride_sn):
    """Rows -> pointers to their block scales as uint64 (8 per superchunk; K % 128 == 0 keeps
    every row 8-byte aligned)."""
    return (s_ptr + offs_n * stride_sn).to(tl.pointer_type(tl.uint64), bitcast=True)


@triton.jit
def _decode_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, n_sc, stride_sn, stride_on, CB: tl.constexpr):
    """Program (t, b): stored tile t (TILE_ROWS rows) x CB superchunks, written in K order."""
    r = tl.arange(0, TILE_R)
    n = tl.program_id(0) * TILE_R + r
    n_ok = n < N
    sc = tl.program_id(1) * CB + tl.arange(0, CB)
    sc_ok = sc < n_sc
    w = tl.arange(0, 16)
    word = tl.load(w_ptr + (tl.program_id(0) * n_sc + sc[None, :, None]) * TILE_WORDS + r[:, None, None] * 16
                   + w[None, None, :], mask=sc_ok[None, :, None], other=0).to(tl.uint32, bitcast=True)
    s8 = tl.load(scale_words(s_ptr, n, stride_sn)[:, None] + sc[None, :], mask=n_ok[:, None] & sc_ok[None, :],
                 other=0)
    l0, l4 = lane_pair(word, 0)
    l1, l5 = lane_pair(word, 1)
    l2, l6 = lane_pair(word, 2)
    l3, l7 = lane_pair(word, 3)
    # (e2m1 * 2^-14) * (e4m3 * 2^14): exact
    l0 *= group_scale(s8, 0, 16384.0)[:, :, None]
    l1 *= group_scale(s8, 1, 16384.0)[:, :, None]
    l2 *= group_scale(s8, 2, 16384.0)[:, :, None]
    l3 *= group_scale(s8, 3, 16384.0)[:, :, None]
    l4 *= group_scale(s8, 4, 16384.0)[:, :, None]
    l5 *= group_scale(s8, 5, 16384.0)[:, :, None]
    l6 *= group_scale(s8, 6, 16384.0)[:, :, None]
    l7 *= group_scale(s8, 7, 16384.0)[:, :, None]
    # [rows, CB, w, bit 2, bit 1, bit 0 of I] -> [rows, CB, I, w]: element 16 I + w, K order
    v = tl.join(tl.join(tl.join(l0, l4), tl.join(l2, l6)), tl.join(tl.join(l1, l5), tl.join(l3, l7)))
    v = tl.reshape(tl.permute(v, (0, 1, 3, 4, 5, 2)), (TILE_R, CB * SUPER_K))
    # (e2m1 * e4m3) * weight_scale_2, rounded once: the same value as nvfp4.dequantize
    v = (v * tl.load(gs_ptr)).to(out_ptr.dtype.element_ty)
    e = tl.program_id(1) * CB * SUPER_K + tl.arange(0, CB * SUPER_K)
    tl.store(out_ptr + n[:, None] * stride_on + e[None, :], v, mask=n_ok[:, None] & (e < n_sc * SUPER_K)[None, :])


def _words(packed_w4a16: torch.Tensor) -> torch.Tensor:
    return packed_w4a16.view(torch.int32)


def _check(packed_w4a16: torch.Tensor, n: int, k: int, scale: torch.Tensor, who: str) -> None:
    if k % SUPER or packed_w4a16.shape != (padded_rows(n), k // 2) or not packed_w4a16.is_contiguous():
        raise ValueError(f"{who}: need K % {SUPER} == 0 and the w4a16 layout of an {n}x{k} weight "
                         f"({padded_rows(n)}x{k // 2} contiguous bytes), got K={k}, {tuple(packed_w4a16.shape)}")
    if scale.shape != (n, k // 16) or scale.stride(1) != 1 or scale.stride(0) % 8 or scale.data_ptr() % 8:
        raise ValueError(f"{who}: need {n}x{k // 16} block scales with 8-byte aligned rows, "
                         f"got {tuple(scale.shape)} strides {scale.stride()} at address {scale.data_ptr():#x}")


def decode(packed_w4a16: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Write dequant(W) into out [N, K] (bf16/fp16/fp32, contiguous columns, any row stride)."""
    n, k = out.shape
    _check(packed_w4a16, n, k, scale, "decode")
    if out.stride(1) != 1:
        raise ValueError(f"decode: need out with contiguous rows, got strides {out.stride()}")
    words = _words(packed_w4a16)
    cb = 1  # a program writes 32 rows x 128 elements
    _decode_kernel[(padded_rows(n) // TILE_ROWS, triton.cdiv(k // SUPER, cb))](
        words, scale.view(torch.uint8), global_scale.reshape(1).float(), out, n, k // SUPER,
        scale.stride(0), out.stride(0), CB=cb, num_warps=4)
    return out


# Every small-M tile the kernel has; tests run them all, choose() picks one per shape.
# FMA tiles (one row): BN rows x G superchunks per iteration (num_stages > 1 lets Triton
# prefetch the next iteration's words while this one decodes).
FMA_CONFIGS = [dict(BN=bn, G=g, DOT=False, num_warps=w, num_stages=st)
               for bn, g, w, st in [(32, 4, 8, 3), (16, 4, 4, 3), (16, 2, 4, 3), (8, 4, 2, 3), (16, 4, 4, 1)]]
# tensor-core tiles: BN rows (whole stored tiles of 32), one superchunk per iteration
DOT_CONFIGS = [dict(BN=bn, G=1, DOT=True, num_warps=4, num_stages=st)
               for bn, st in [(32, 2), (64, 3), (128, 2), (32, 3), (64, 2), (128, 3)]]


def configs_for(m: int) -> list[dict]:
    """The tiles that can run M rows (the FMA tiles run one)."""
    return (FMA_CONFIGS if m == 1 else []) + DOT_CONFIGS


@triton.jit
def _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, s_lo, s_hi, n_sc, stride_sn,
                 BN: tl.constexpr, G: tl.constexpr):
    """One row, fp32 FMAs on [BN, G superchunks, 4 quarters, 4 words] tiles: a thread holds 16-byte
    quarters, so each scale group's 4 products per quarter are summed in its registers and
    scaled once; quarters and superchunks are summed at the end."""
    g = tl.arange(0, G)
    q = tl.arange(0, 4)
    j = tl.arange(0, 4)
    w_off = word_offsets(offs_n, n_sc)
    s_row = scale_words(s_ptr, offs_n, stride_sn)
    acc = tl.zeros((BN, G, 4), dtype=tl.float32)
    for s0 in range(s_lo, s_hi, G):
        sc = s0 + g
        ok = sc < s_hi
        word = tl.load(w_ptr + w_off[:, None, None, None] + sc[None, :, None, None] * TILE_WORDS
                       + 4 * q[None, None, :, None] + j[None, None, None, :],
                       mask=n_mask[:, None, None, None] & ok[None, :, None, None], other=0).to(tl.uint32, bitcast=True)
        s8 = tl.load(s_row[:, None] + sc[None, :], mask=n_mask[:, None] & ok[None, :], other=0)
        # activations addressed over the whole tile (offs_n * 0): each thread loads the values it
        # multiplies (L1 hits) instead of a broadcast through shared memory
        x = (a_ptr + offs_n[:, None, None, None] * 0 + sc[None, :, None, None] * SUPER_K
             + 4 * q[None, None, :, None] + j[None, None, None, :])
        x_ok = ok[None, :, None, None] & n_mask[:, None, None, None]
        for i in tl.static_range(4):
            lo, hi = lane_pair(word, i)
            xa = tl.load(x + 16 * i, mask=x_ok, other=0.0).to(tl.float32)
            xb = tl.load(x + 16 * (i + 4), mask=x_ok, other=0.0).to(tl.float32)
            acc += (tl.sum(lo * xa, axis=3) * group_scale(s8, i, 16384.0)[:, :, None]
                    + tl.sum(hi * xb, axis=3) * group_scale(s8, i + 4, 16384.0)[:, :, None])
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, s_lo, s_hi, n_sc, stride_am, stride_sn,
                 BN: tl.constexpr, ASM: tl.constexpr):
    """Tensor cores, rows padded to 16: per superchunk, 8 dots [16, 16] x [16, BN], one per scale
    group, each scaled per output channel."""
    rows = tl.arange(0, 16)
    r_ok = rows < M
    w = tl.arange(0, 16)
    w_off = word_offsets(offs_n, n_sc)
    s_row = scale_words(s_ptr, offs_n, stride_sn)
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for sc in range(s_lo, s_hi):
        word = tl.load(w_ptr + w_off[None, :] + sc * TILE_WORDS + w[:, None], mask=n_mask[None, :],
                       other=0).to(tl.uint32, bitcast=True)
        s8 = tl.load(s_row + sc, mask=n_mask, other=0)
        x = a_ptr + rows[:, None] * stride_am + sc * SUPER_K + w[None, :]
        for i in tl.static_range(8):
            xi = tl.load(x + 16 * i, mask=r_ok[:, None], other=0.0)
            if ASM:
                part = tl.dot(xi, lane_bf16(word, i))
            else:  # the CPU interpreter: fp32 operands
                part = tl.dot(xi.to(tl.float32), lane_f32(word, i), input_precision="ieee")
            acc += part * group_scale(s8, i)[None, :]
    return acc, rows


@triton.jit
def _small_m_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_sn, stride_cm,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                    DOT: tl.constexpr, ASM: tl.constexpr):
    """Program (n, s) owns BN output channels and the s-th of SPLIT K ranges, and streams those
    4-bit weights once. SPLIT > 1 adds fp32 partial sums atomically into a zeroed c."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    n_sc = K // SUPER_K
    per = tl.cdiv(n_sc, SPLIT)
    s_lo = pid_k * per
    s_hi = tl.minimum(s_lo + per, n_sc)
    if DOT:
        acc, rows = _small_m_dot(a_ptr, w_ptr, s_ptr, offs_n, n_mask, M, s_lo, s_hi, n_sc, stride_am, stride_sn,
                                 BN, ASM)
    else:
        acc = _small_m_fma(a_ptr, w_ptr, s_ptr, offs_n, n_mask, s_lo, s_hi, n_sc, stride_sn, BN, G)[None, :]
        rows = tl.arange(0, 1)
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


def split_for(programs: int, n_sc: int, sms: int, per_sm: float) -> int:
    """K ranges per output tile: about per_sm programs per SM in all, each range keeping at least 3
    superchunks, at most 8 ranges."""
    return max(1, min(round(per_sm * sms / programs), n_sc // 3, 8))


def choose(m: int, n: int, k: int, sms: int) -> tuple[dict, int]:
    """The tile and K split for this shape, fixed from H100 timings of every tile and split on the
    FLUX shapes (BENCHMARKS.md, section 2) rather than by Triton's autotuner: for these
    few-microsecond kernels its picks differed between runs on the same card, and its per-call
    bookkeeping costs host time. One row: the FMA tile, K split only when N gives fewer than 2
    programs per SM (then ~4.4 per SM). More rows: tensor cores, 128 rows per program for wide
    layers, 32 for 3072 x 3072, ~3.3 programs per SM."""
    n_sc = k // SUPER
    if m == 1:
        cfg = FMA_CONFIGS[0]
        programs = triton.cdiv(n, cfg["BN"])
        return cfg, 1 if programs >= 2 * sms else split_for(programs, n_sc, sms, 4.4)
    bn = 128 if n >= 8192 else (64 if k > 4096 else 32)
    cfg = next(c for c in DOT_CONFIGS if c["BN"] == bn)  # the first listed: its best pipeline depth
    return cfg, split_for(triton.cdiv(n, bn), n_sc, sms, 3.3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count  # once per device, not per call


def small_m_gemm(x2d: torch.Tensor, packed_w4a16: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None,
                 split: int | None = None) -> torch.Tensor:
    """out[M, N] (contiguous columns, any row stride) = x2d @ dequant(W).T + bias, M <= 16.
    config/split: one of configs_for(M) and a K split (tests, benchmarks); default: choose()."""
    m, k = x2d.shape
    n = out.shape[1]
    if m > SMALL_M_MAX or out.shape[0] != m or out.stride(1) != 1:
        raise ValueError(f"small_m_gemm: need M <= {SMALL_M_MAX} and out {m}x{n} with contiguous rows, "
                         f"got M={m}, out {tuple(out.shape)}")
    _check(packed_w4a16, n, k, scale, "small_m_gemm")
    if config is None or split is None:
        picked, picked_split = choose(m, n, k, _sm_count(x2d.device) if x2d.is_cuda else 1)
        config = picked if config is None else config
        split = picked_split if split is None else split
    x2d = x2d.to(torch.bfloat16).contiguous()
    words = _words(packed_w4a16)
    target = out if split == 1 else torch.zeros((m, n), device=out.device, dtype=torch.float32)
    _small_m_kernel[(triton.cdiv(n, config["BN"]), split)](
        x2d, words, scale.view(torch.uint8), global_scale.reshape(1).float(), bias if bias is not None else x2d,
        target, m, n, k, x2d.stride(0), scale.stride(0), target.stride(0),
        HAS_BIAS=bias is not None, SPLIT=split, ASM=x2d.is_cuda, **config)  # no inline PTX on the interpreter
    if target is not out:
        out.copy_(target)
    return out
