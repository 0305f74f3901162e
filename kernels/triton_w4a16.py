"""w4a16 Triton kernels over the w4a16 layout (w4a16_layout): 128-element superchunks of sixteen
32-bit words, each word holding two neighbouring elements of four scale groups, placed for a
rotate-and-mask decode to bf16; re-encoded block scales whose bf16 bits are a shift and one logic
op away; both stored 32 rows at a time.

small-M (M <= SMALL_M_MAX: the modulation GEMMs at batch M, the time/guidance/vector MLPs):
  y = x @ dequant(W).T + bias on tensor cores, computed transposed (W x^T): the decoded weights
  are the MMA's A operand [BN, 128] per superchunk, straight from registers, the activations its
  B operand x^T [128, MT] (MT = 8 tokens up to M = 8, the m16n8k16 MMA's N, else 16; tiles of 4
  warps become wgmma with A from registers on SM 9.0), so few tokens waste little of each MMA,
  and the weight is read once as 4-bit codes + 1-byte scales (0.56 bytes per weight instead of
  bf16's 2). Decoding one register of a group's weights (two weights of one row) is a rotate, a
  mask and one bf16x2 multiply by the group's scale (`pair_bf16`, inline PTX on the register pair
  of words 2p, 2p + 1): e2m1 * scale / 2^20, exact, so the products accumulate straight into the
  fp32 accumulator. Triton keeps the decode in registers: the words go from its pipelined
  shared-memory buffer into the operand layout, the 8 decoded groups are joined along K without
  moving (checked in the Triton 3.6 TTGIR for sm_90, and by tests/triton_compile_all.py), no
  decoded weight goes through shared memory. K is split when N alone gives too few programs:
  each K range stores its fp32 partial sums in a workspace and the last range of a column tile
  to finish (a per-tile arrival counter) adds them up in K order and writes the output, so a
  call is one launch (no zeroing, no atomics per output, no copy) and its result deterministic.
decode: the layer's weight decoded to a transient bf16/fp16 [N, K] buffer in one pass (read
  0.56 B, write 2 B per weight), for cuBLAS to multiply at large M where the GEMM is
  compute-bound and a decoding GEMM loses (the in-kernel decode measured 0.27x bf16 at M=4096).
preparation_launches: the variants preparing a model's layers runs (pack, decode, small-M at one
  row), built on meta tensors by the same functions the calls use (_pack_launch, _decode_launch,
  _small_m_launch), so they are the same variants, for compile_ahead.TritonKernelsAhead.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import LayerShape, Launch, cdiv, direct, sm_count
from .versions import release
from .w4a16_layout import (ROTATION, SCALE_BIAS, SCALE_EXP, SCALE_SHIFT, SUPER, TARGET_BIT, TILE_ROWS,
                           WEIGHT_FACTOR, check_packable, padded_rows)

SMALL_M_MAX = 16
# the layout's sizes and tables as constants the kernels can read
SUPER_K = tl.constexpr(SUPER)
TILE_R = tl.constexpr(TILE_ROWS)
TILE_WORDS = tl.constexpr(TILE_ROWS * 16)  # int32 words of one stored tile of one superchunk
TILE_SCALE_WORDS = tl.constexpr(TILE_ROWS * 2)  # int32 words of its scales (8 bytes a row)
S_BIAS = tl.constexpr(SCALE_BIAS)
WEIGHT_F = tl.constexpr(WEIGHT_FACTOR)
# The layout's tables as one integer each, 5 bits an entry, read in the kernels with shifts of
# constexprs: Triton 3.3 cannot index a constexpr tuple, its CPU interpreter has no .value on the
# indices, and a shift means the same in both.
ROT_BITS = tl.constexpr(sum(r << (5 * (4 * j + b)) for j, row in enumerate(ROTATION) for b, r in enumerate(row)))
BIT_BITS = tl.constexpr(sum(t << (5 * b) for b, t in enumerate(TARGET_BIT)))


def _pair_asm(group: int) -> str:
    """pair_bf16's PTX for one group: per distinct rotation of its field, rotate the word that holds
    the group (the pair's first for groups 0-3, second for 4-7) and mask the bf16 bits it places."""
    src = "$1" if group < 4 else "$2"
    rotations = ROTATION[group % 4]
    parts = []
    for r in dict.fromkeys(rotations):  # distinct, in order
        mask = sum(1 << TARGET_BIT[b] for b in range(4) if rotations[b] == r) * 0x10001
        parts.append((r, mask))
    lines, regs = [], ["t", "u"]
    for (r, mask), reg in zip(parts, regs):
        dst = "$0" if len(parts) == 1 else reg
        if r:
            lines.append(f"shf.l.wrap.b32 {reg}, {src}, {src}, {r};")
            lines.append(f"and.b32 {dst}, {reg}, 0x{mask:08X};")
        else:
            lines.append(f"and.b32 {dst}, {src}, 0x{mask:08X};")
    if len(parts) == 2:
        lines.append("or.b32 $0, t, u;")
    return "{ .reg .b32 t, u; " + " ".join(lines) + " }"


# one constexpr string per group, passed down by the caller (a tuple of them Triton 3.3 cannot index)
PAIR_ASM = tuple(tl.constexpr(_pair_asm(i)) for i in range(8))
PAIR0, PAIR1, PAIR2, PAIR3, PAIR4, PAIR5, PAIR6, PAIR7 = PAIR_ASM


@triton.jit
def rotl(word, R: tl.constexpr):
    """uint32 words rotated left by R (0..31)."""
    if R == 0:
        out = word
    else:
        out = (word << R) | (word >> (32 - R))
    return out


@triton.jit
def field_fp16(word, J: tl.constexpr):
    """uint32 words -> the two nibbles of field J as fp16 bit patterns of e2m1 * 2^-14: each nibble
    bit rotated by ROTATION[J] onto its bf16 bit (TARGET_BIT), the magnitude bits 3 further (fp16's
    exponent field is 3 bits narrower than bf16's)."""
    # 2 ** bit, not 1 << bit: the interpreter's constexpr has no reflected shift
    out = rotl(word, (ROT_BITS >> (5 * (4 * J + 3))) & 31) & (2 ** ((BIT_BITS >> (5 * 3)) & 31) * 0x10001)  # the sign
    for b in tl.static_range(3):
        out |= (rotl(word, (((ROT_BITS >> (5 * (4 * J + b))) & 31) + 3) % 32)
                & (2 ** (((BIT_BITS >> (5 * b)) & 31) + 3) * 0x10001))
    return out


@triton.jit
def pair_bf16(word, ASM: tl.constexpr):
    """[16, BN] words of a superchunk in the tensor cores' operand layout -> group I as a bf16
    operand of e2m1 * 2^-126 (times `scales_bf16`); ASM is that group's PAIR_ASM[I]. Inline PTX
    on a register pair: words 2p (groups 0-3) and 2p + 1 (groups 4-7) hold both elements 2p,
    2p + 1 of the pair's register, so each output register is one rotate and mask (two for
    field 3) of one of them (`_pair_asm`)."""
    return tl.inline_asm_elementwise(asm=ASM, constraints="=r,r,r", args=[word], dtype=tl.bfloat16,
                                     is_pure=True, pack=2)


@triton.jit
def scales_bf16(s_word, J: tl.constexpr):
    """int32 words of 4 w4a16 scale bytes -> bytes J and J + 2 (J = 0, 1) as bf16 |scale| * 2^106:
    times pair_bf16's e2m1 * 2^-126, the weight / WEIGHT_FACTOR, exact. One shift and one logic op
    make both (inline PTX: the two halves of one register)."""
    SHIFT: tl.constexpr = "shl.b32 t, $2, 4;" if J == 0 else "shr.b32 t, $2, 4;"
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t; " + SHIFT + " lop3.b32 t, t, 0x0FF00FF0, " + f"{S_BIAS * 0x10001}" + ", 0xEA; "
            "mov.b32 {$0, $1}, t; }",
        constraints="=h,=h,r", args=[s_word], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


F32_SCALE_EXP = tl.constexpr(SCALE_EXP - SCALE_SHIFT + 14)  # fp32 exponent of the byte u = 0, * 2^14


@triton.jit
def scale_f32(s_word, J: tl.constexpr):
    """-> |scale| * 2^14 as fp32 (times field_f32's e2m1 * 2^-14: e2m1 * |scale|, exact): the
    byte's 5 exponent and 3 mantissa bits moved to fp32's fields, the exponent rebased."""
    return ((((s_word >> (8 * J)) & 0xFF) << 20) + (F32_SCALE_EXP << 23)).to(tl.float32, bitcast=True)


@triton.jit
def field_f32(word, J: tl.constexpr):
    """uint32 words -> field J's (low, high) elements as fp32 e2m1 * 2^-14, exact (fp16 bits;
    fp16 -> fp32 keeps the subnormal e = 0 codes)."""
    bits = field_fp16(word, J)
    lo = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def word_offsets(offs_n, n_sc):
    """Rows -> int32 offset of word 0 of their superchunk 0 (add superchunk * TILE_WORDS)."""
    return (offs_n // TILE_R) * (n_sc * TILE_WORDS) + (offs_n % TILE_R) * 16


@triton.jit
def scale_offsets(offs_n, n_sc):
    """Rows -> int32 offset of their superchunk 0's scale word of groups 0-3 (groups 4-7: + 1;
    add superchunk * TILE_SCALE_WORDS)."""
    return (offs_n // TILE_R) * (n_sc * TILE_SCALE_WORDS) + (offs_n % TILE_R) * 2


@triton.jit
def _scaled_field(word, s_word, J: tl.constexpr):
    """[.., h] words and their half's scale words -> field J's elements e2m1 * scale, [.., h, eh]."""
    lo, hi = field_f32(word, J)
    s = scale_f32(s_word, J)
    return tl.join(lo * s, hi * s)


@triton.jit(do_not_specialize=["n_sc"])  # n_sc % 16 changes no instruction: one variant fewer
def _decode_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, n_sc, stride_on):
    """Program (t, s): stored tile t (TILE_ROWS rows) x superchunk s, written in K order."""
    r = tl.arange(0, TILE_R)
    n = tl.program_id(0) * TILE_R + r
    sc = tl.program_id(1)
    p = tl.arange(0, 8)
    h = tl.arange(0, 2)
    base = tl.program_id(0) * n_sc + sc
    # [rows, pair p, half h]: word 2p + h
    word = tl.load(w_ptr + base * TILE_WORDS + r[:, None, None] * 16 + 2 * p[None, :, None]
                   + h[None, None, :]).to(tl.uint32, bitcast=True)
    s_word = tl.load(s_ptr + base * TILE_SCALE_WORDS + r[:, None] * 2 + h[None, :])[:, None, :]
    v0 = _scaled_field(word, s_word, 0)
    v1 = _scaled_field(word, s_word, 1)
    v2 = _scaled_field(word, s_word, 2)
    v3 = _scaled_field(word, s_word, 3)
    v = tl.join(tl.join(v0, v1), tl.join(v2, v3))  # [rows, p, h, eh, j bit 0, j bit 1]
    # element 16 (4 h + j) + 2 p + eh: K order is [h, j bit 1, j bit 0, p, eh]
    v = tl.reshape(tl.permute(v, (0, 2, 5, 4, 1, 3)), (TILE_R, SUPER_K))
    # (e2m1 * e4m3) * weight_scale_2, rounded once: the same value as nvfp4.dequantize
    v = (v * tl.load(gs_ptr)).to(out_ptr.dtype.element_ty)
    e = sc * SUPER_K + tl.arange(0, SUPER_K)
    tl.store(out_ptr + n[:, None] * stride_on + e[None, :], v, mask=(n < N)[:, None])


@triton.jit(do_not_specialize=["n_sc"])  # n_sc % 16 changes no instruction: one variant fewer
def _pack_kernel(code_ptr, scale_ptr, w_out, s_out, N, n_sc, stride_cn, stride_sn):
    """Program (t, s): the canonical codes and e4m3 scales of rows of stored tile t x superchunk s
    -> their w4a16 words and scale bytes (w4a16_layout.w4a16_pack is the reference)."""
    r = tl.arange(0, TILE_R)
    n = tl.program_id(0) * TILE_R + r
    sc = tl.program_id(1)
    ok = n < N  # padded rows: zero codes and scales
    w = tl.arange(0, 16)
    j = tl.arange(0, 4)
    # word w = 2p + h holds field j of group 4h + j: canonical byte 8 (4h + j) + p (its two
    # nibbles are the pair's elements 2p, 2p + 1)
    group = 4 * (w % 2)[None, :, None] + j[None, None, :]
    byte = tl.load(code_ptr + n[:, None, None] * stride_cn + sc * 64 + 8 * group + (w // 2)[None, :, None],
                   mask=ok[:, None, None], other=0).to(tl.uint32)
    raw = tl.load(scale_ptr + n[:, None, None] * stride_sn + sc * 8 + group, mask=ok[:, None, None],
                  other=0).to(tl.uint32)
    byte = tl.where((raw & 0x7F) == 0, 0, byte ^ ((raw >> 7) * 0x88))  # zero scale: no codes; negative: signs flipped
    word = tl.zeros((TILE_R, 16, 4), dtype=tl.uint32)
    for b in tl.static_range(4):
        rot = tl.zeros((4,), dtype=tl.uint32)
        for jj in tl.static_range(4):
            rot = tl.where(j == jj, (ROT_BITS >> (5 * (4 * jj + b))) & 31, rot)
        for eh in tl.static_range(2):
            bit = (byte >> (4 * eh + b)) & 1
            word |= bit << ((32 - rot[None, None, :] + ((BIT_BITS >> (5 * b)) & 31) + 16 * eh) % 32)
    word = tl.sum(word, axis=2)  # the four fields' bits are disjoint: the sum is their OR
    base = tl.program_id(0) * n_sc + sc
    tl.store(w_out + base * TILE_WORDS + r[:, None] * 16 + w[None, :], word.to(tl.int32, bitcast=True))
    # scale byte u: (u << 4) | SCALE_BIAS are the bf16 bits of |s| * 2^106
    g = tl.arange(0, 8)
    raw = tl.load(scale_ptr + n[:, None] * stride_sn + sc * 8 + g[None, :], mask=ok[:, None], other=0).to(tl.int32)
    e = (raw >> 3) & 15
    m = raw & 7
    lead = (m >= 2).to(tl.int32) + (m >= 4).to(tl.int32)  # subnormal m * 2^-9: m's leading bit
    sub = (lead << 3) | ((m << (3 - lead)) & 7)
    u = tl.where(e > 0, ((e + 2) << 3) | m, sub)
    u = tl.where((raw & 0x7F) == 0, 0, u)
    tl.store(s_out + base * TILE_SCALE_WORDS * 4 + r[:, None] * 8 + g[None, :], u.to(tl.uint8))


def pack(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w4a16_layout.w4a16_pack in one kernel on the tensors' device (the same bytes, the same
    refusals): canonical codes uint8 [N, K/2] and e4m3 block scales [N, K/16] -> the w4a16 codes
    and scales."""
    check_packable(packed, block_scale)
    codes, scales, launch = _pack_launch(packed, block_scale)
    if packed.shape[0]:
        _pack_kernel[launch.grid](*launch.args, **launch.options)
    return codes, scales


def _pack_launch(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Launch]:
    """The outputs and the launch of pack (also built on meta tensors by preparation_launches)."""
    n, half_k = packed.shape
    k = half_k * 2
    rows = padded_rows(n)
    codes = torch.empty((rows, k // 2), device=packed.device, dtype=torch.uint8)
    scales = torch.empty((rows, k // 16), device=packed.device, dtype=torch.uint8)
    raw = block_scale.view(torch.uint8)
    return codes, scales, Launch(_pack_kernel, (rows // TILE_ROWS, k // SUPER),
                                 (packed, raw, _words(codes), scales, n, k // SUPER, packed.stride(0), raw.stride(0)),
                                 dict(num_warps=4))


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _check(packed_w4a16: torch.Tensor, scale_w4a16: torch.Tensor, n: int, k: int, who: str) -> None:
    for what, t, cols in (("codes", packed_w4a16, k // 2), ("scales", scale_w4a16, k // 16)):
        if k % SUPER or t.shape != (padded_rows(n), cols) or t.dtype != torch.uint8 or not t.is_contiguous():
            raise ValueError(f"{who}: need K % {SUPER} == 0 and the w4a16 layout's {what} of an {n}x{k} weight "
                             f"(contiguous uint8 {padded_rows(n)}x{cols}), got K={k}, {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()}")


def decode(packed_w4a16: torch.Tensor, scale_w4a16: torch.Tensor, global_scale: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """Write dequant(W) into out [N, K] (bf16/fp16/fp32, contiguous columns, any row stride)."""
    n, k = out.shape
    _check(packed_w4a16, scale_w4a16, n, k, "decode")
    if out.stride(1) != 1:
        raise ValueError(f"decode: need out with contiguous rows, got strides {out.stride()}")
    launch = _decode_launch(packed_w4a16, scale_w4a16, global_scale, out)
    direct(_decode_kernel)(launch.grid, launch.args, launch.options)
    return out


def _decode_launch(packed_w4a16, scale_w4a16, global_scale, out) -> Launch:
    n, k = out.shape
    return Launch(_decode_kernel, (padded_rows(n) // TILE_ROWS, k // SUPER),  # a program: 32 rows x 128 elements
                  (_words(packed_w4a16), _words(scale_w4a16), global_scale.reshape(1).float(), out, n, k // SUPER,
                   out.stride(0)), dict(num_warps=4))


# Every small-M tile the kernel has (tests run them all, choose() picks one per shape): BN weight
# rows (whole stored tiles of 32) x one superchunk per iteration, num_stages-deep prefetch, the
# warps split over the rows (2 warps suit BN 32-64, 4 warps BN 64-128; 8 warps and 256 rows were
# 7-41% slower). The token tile (8 or 16 rows) follows M, not the config.
CONFIGS = [dict(BN=bn, num_warps=nw, num_stages=st)
           for bn, nw, st in [(64, 2, 3), (32, 2, 4), (64, 4, 3), (128, 4, 3), (128, 4, 4)]]

# Dots 8 wide: Triton's NVIDIA backend takes them from 3.5 on (its min_dot_size); 3.3 and 3.4
# refuse any dot dimension under 16.
NARROW_DOT = release(triton.__version__)[:2] >= (3, 5)


def token_tile(m: int, narrow: bool = NARROW_DOT) -> int:
    """Rows of the activation tile: 8 up to M = 8 (the m16n8k16 MMA's N) where Triton allows a
    dot that narrow, else 16."""
    return 8 if m <= 8 and narrow else 16


@triton.jit
def _group_weights(word, s, ASM: tl.constexpr):
    """[BN, 16] words of a superchunk -> one group's decoded weights times its scales s [BN] (bf16;
    ASM: the group's PAIR_ASM), still in registers."""
    return pair_bf16(word, ASM) * s[:, None]


@triton.jit
def _small_m_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, part_ptr, count_ptr, M, N, K, stride_am,
                    stride_cm, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, MT: tl.constexpr,
                    ASM: tl.constexpr):
    """Program (n, s) owns BN output channels and the s-th of SPLIT K ranges (balanced: any split
    count), and streams those 4-bit weights once; it computes the transposed tile
    acc[BN, MT] = W x^T. SPLIT > 1: part_ptr holds [SPLIT, M, N] fp32 partial sums, count_ptr one
    zeroed int32 arrival counter per column tile, which the tile's last program resets."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    n_sc = K // SUPER_K
    toks = tl.arange(0, MT)
    t_ok = toks < M
    w = tl.arange(0, 16)
    kk = tl.arange(0, SUPER_K)
    w_off = word_offsets(offs_n, n_sc)
    s_off = scale_offsets(offs_n, n_sc)
    acc = tl.zeros((BN, MT), dtype=tl.float32)
    for sc in range(pid_k * n_sc // SPLIT, (pid_k + 1) * n_sc // SPLIT):
        s03 = tl.load(s_ptr + s_off + sc * TILE_SCALE_WORDS, mask=n_mask, other=0)  # groups 0-3
        s47 = tl.load(s_ptr + s_off + sc * TILE_SCALE_WORDS + 1, mask=n_mask, other=0)  # groups 4-7
        x_t = a_ptr + toks[None, :] * stride_am + sc * SUPER_K  # [., MT]: the tokens' superchunk, transposed
        if ASM:
            word = tl.load(w_ptr + w_off[:, None] + sc * TILE_WORDS + w[None, :], mask=n_mask[:, None], other=0)
            s0, s2 = scales_bf16(s03, 0)
            s1, s3 = scales_bf16(s03, 1)
            s4, s6 = scales_bf16(s47, 0)
            s5, s7 = scales_bf16(s47, 1)
            # the 8 groups joined along K in registers (k = 16 group + w): one dot of K = 128
            g01 = tl.join(_group_weights(word, s0, PAIR0), _group_weights(word, s1, PAIR1))
            g23 = tl.join(_group_weights(word, s2, PAIR2), _group_weights(word, s3, PAIR3))
            g45 = tl.join(_group_weights(word, s4, PAIR4), _group_weights(word, s5, PAIR5))
            g67 = tl.join(_group_weights(word, s6, PAIR6), _group_weights(word, s7, PAIR7))
            g = tl.join(tl.join(g01, g23), tl.join(g45, g67))  # [BN, w, group bit 0, bit 1, bit 2]
            weights = tl.reshape(tl.permute(g, (0, 4, 3, 2, 1)), (BN, SUPER_K))
            acc = tl.dot(weights, tl.load(x_t + kk[:, None], mask=t_ok[None, :], other=0.0), acc)
        else:  # the CPU interpreter (no inline PTX, no bf16 dot): fp32, each element from its word
            for i in tl.static_range(8):
                word = tl.load(w_ptr + w_off[:, None] + sc * TILE_WORDS + (w[None, :] // 2) * 2 + i // 4,
                               mask=n_mask[:, None], other=0)
                lo, hi = field_f32(word.to(tl.uint32, bitcast=True), i % 4)
                s = scale_f32(s03 if i < 4 else s47, i % 4) * (1 / WEIGHT_F)
                xi = tl.load(x_t + 16 * i + w[:, None], mask=t_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(tl.where(w[None, :] % 2 == 0, lo, hi) * s[:, None], xi, acc, input_precision="ieee")
    ok = n_mask[:, None] & t_ok[None, :]
    if SPLIT > 1:
        part = part_ptr + toks[None, :] * N + offs_n[:, None]
        tl.store(part + pid_k * M * N, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial stored before the arrival is counted
        # acq_rel at GPU scope: our partials are released with the count, the last program acquires all
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            acc = tl.zeros((BN, MT), dtype=tl.float32)
            for j in tl.static_range(SPLIT):  # K order, whichever range finished last: deterministic
                acc += tl.load(part + j * M * N, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + tl.program_id(0), 0)  # ready for the next call
            _finish(acc, gs_ptr, bias_ptr, c_ptr, toks, offs_n, n_mask, ok, stride_cm, HAS_BIAS)
    else:
        _finish(acc, gs_ptr, bias_ptr, c_ptr, toks, offs_n, n_mask, ok, stride_cm, HAS_BIAS)


@triton.jit
def _finish(acc, gs_ptr, bias_ptr, c_ptr, toks, offs_n, n_mask, ok, stride_cm, HAS_BIAS: tl.constexpr):
    """The full K sum [BN, MT] -> times the global scale, plus bias, cast and stored transposed."""
    acc = acc * (tl.load(gs_ptr) * WEIGHT_F)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + toks[None, :] * stride_cm + offs_n[:, None], acc.to(c_ptr.dtype.element_ty), mask=ok)


def split_for(tiles: int, n_sc: int, sms: int) -> int:
    """K ranges per column tile: the fewest that give at least 5.5 programs per SM in all, each
    range keeping at least 3 superchunks, at most 16 ranges."""
    return max(1, min(-(-55 * sms // (10 * tiles)), n_sc // 3, 16))


@functools.lru_cache(maxsize=None)
def choose(m: int, n: int, k: int, sms: int) -> tuple[dict, int]:
    """The tile and K split for this shape, fixed from timings of every tile and split on the FLUX
    shapes (BENCHMARKS.md, section 2) rather than by Triton's autotuner: for these
    few-microsecond kernels its picks differed between runs on the same card, and its per-call
    bookkeeping costs host time. 64 rows per program on 2 warps, 3-deep prefetch, for every M and
    shape (within 2.2% of the best tile on the wide layers, 2-12% on 3072 x 3072); split_for's K
    ranges (on 132 SMs: 8 on 3072 x 3072 and 6144 x 6144, 6 on 3072 -> 9216, 4 on 6144 -> 12288,
    3 on 18432 rows, 2 on 36864, 16 on 12288 -> 3072) came within
    1.5% of each shape's best split on average over 8 FLUX.1 and FLUX.2 shapes at M = 1, 4 and
    16, 9% at worst."""
    cfg = CONFIGS[0]
    return cfg, split_for(triton.cdiv(n, cfg["BN"]), k // SUPER, sms)


def small_m_gemm(x2d: torch.Tensor, packed_w4a16: torch.Tensor, scale_w4a16: torch.Tensor, global_scale: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None,
                 split: int | None = None) -> torch.Tensor:
    """out[M, N] (contiguous columns, any row stride) = x2d @ dequant(W).T + bias, M <= 16.
    config/split: one of CONFIGS and a K split (tests, benchmarks); default: choose()."""
    m, k = x2d.shape
    n = out.shape[1]
    if m > SMALL_M_MAX or out.shape[0] != m or out.stride(1) != 1:
        raise ValueError(f"small_m_gemm: need M <= {SMALL_M_MAX} and out {m}x{n} with contiguous rows, "
                         f"got M={m}, out {tuple(out.shape)}")
    _check(packed_w4a16, scale_w4a16, n, k, "small_m_gemm")
    if config is None or split is None:
        picked, picked_split = choose(m, n, k, sm_count(x2d.device))
        config = picked if config is None else config
        split = picked_split if split is None else split
    launch = _small_m_launch(x2d, packed_w4a16, scale_w4a16, global_scale, bias, out, config, split)
    direct(_small_m_kernel)(launch.grid, launch.args, launch.options)
    return out


def _small_m_launch(x2d, packed_w4a16, scale_w4a16, global_scale, bias, out, config: dict, split: int) -> Launch:
    """The launch of one small_m_gemm call (preparation_launches builds it on meta tensors: the same
    argument types, values and alignments, so the same compiled variant)."""
    m, k = x2d.shape
    n = out.shape[1]
    if x2d.dtype != torch.bfloat16 or x2d.stride(1) != 1:
        x2d = x2d.to(torch.bfloat16).contiguous()
    if global_scale.dtype != torch.float32:  # the kernel reads its one element
        global_scale = global_scale.float()
    tiles = cdiv(n, config["BN"])
    if split > 1:
        if out.is_meta:
            parts = torch.empty(split * m * n, device="meta", dtype=torch.float32)
            counts = torch.empty(tiles, device="meta", dtype=torch.int32)
        else:
            parts, counts = _split_scratch(out.device, split * m * n, tiles)
    else:
        parts = counts = out  # unused
    # ASM: inline PTX everywhere but on the CPU interpreter (meta tensors stand for the GPU)
    return Launch(_small_m_kernel, (tiles, split),
                  (x2d, _words(packed_w4a16), _words(scale_w4a16), global_scale,
                   bias if bias is not None else x2d, out, parts, counts, m, n, k, x2d.stride(0), out.stride(0)),
                  dict(HAS_BIAS=bias is not None, SPLIT=split, MT=token_tile(m), ASM=not x2d.is_cpu, **config))


_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_scratch(device: torch.device, part_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 buffer of at least `part_elems` for the K ranges' partial sums, and zeroed int32
    arrival counters, at least `tiles`, kept per device and stream. Kernels on one stream run one
    after another, so they share them: each writes every partial sum it reads and resets the
    counters it used (they stay zero between calls). Two streams must not share them. Kept, not
    allocated per call: an allocation costs ~5 us of host time at M = 1."""
    # the raw stream id (as Triton reads it): torch.cuda.current_stream() costs ~20 us of host time
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    kept = _SCRATCH.get(key)
    if kept is not None and kept[0].numel() >= part_elems and kept[1].numel() >= tiles:
        return kept
    parts, counts = kept or (None, None)
    if parts is None or parts.numel() < part_elems:
        parts = torch.empty(part_elems, device=device, dtype=torch.float32)
    if counts is None or counts.numel() < tiles:  # a new, larger set: the old one's counts are all zero
        counts = torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32)
    kept = _SCRATCH[key] = (parts, counts)
    return kept


def preparation_launches(layer: LayerShape, device: torch.device) -> list[Launch]:
    """The launches preparing a layer of this shape on `device` makes (pack per part) and its
    self-check (bf16: at SELF_CHECK_ROWS rows decode per part, then cuBLAS; at one row small-M per
    part), on meta tensors (for compile_ahead.TritonKernelsAhead)."""
    meta = dict(device="meta")
    n_total, k = sum(layer.rows), layer.k
    bias = torch.empty(n_total, dtype=torch.bfloat16, **meta) if layer.has_bias else None
    x = torch.empty((1, k), dtype=torch.bfloat16, **meta)
    out = torch.empty((1, n_total), dtype=torch.bfloat16, **meta)
    weight = torch.empty((n_total, k), dtype=torch.bfloat16, **meta)
    gscale = torch.empty((), dtype=torch.float32, **meta)
    launches, start = [], 0
    for n in layer.rows:
        codes, scales, pack_launch = _pack_launch(torch.empty((n, k // 2), dtype=torch.uint8, **meta),
                                                  torch.empty((n, k // 16), dtype=torch.float8_e4m3fn, **meta))
        cfg, split = choose(1, n, k, sm_count(device))
        launches += [pack_launch, _decode_launch(codes, scales, gscale, weight[start:start + n]),
                     _small_m_launch(x, codes, scales, gscale, None if bias is None else bias[start:start + n],
                                     out[:, start:start + n], cfg, split)]
        start += n
    return launches

