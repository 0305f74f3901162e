"""Triton kernels of the fused FLUX blocks (fp8 backend, kernels/fused_blocks.py).

Each kernel replaces a chain of ComfyUI's elementwise passes around a linear layer with one pass
that reads each activation once and writes what the next GEMM (or attention) reads:

ln_mod_quant:  LayerNorm (no affine) -> x * (1 + scale) + shift -> per-token FP8 e4m3 + row scale
               (ComfyUI: layer_norm, addcmul, then our act_quant: three reads, two bf16 writes).
gelu_quant:    [prefix | GELU-tanh(h)] -> per-token FP8 (the MLP's second linear; in single blocks
               the prefix is the attention output, which ComfyUI concatenates first).
swiglu_quant:  [prefix | SiLU(h1) * h2], h = [h1 | h2] -> per-token FP8: the same for FLUX.2's
               gated MLPs (ComfyUI: chunk, silu, mul, then our act_quant: four passes).
qk_norm_rope:  q, k RMSNorm with their weights -> RoPE; q, k, v written straight into the
               [B, H, L, D] tensors attention reads, at a token offset (ComfyUI: rms_norm x2,
               casts, torch.cat x3, apply_rope).

Where ComfyUI rounds an intermediate to the compute dtype (bf16 or fp16: the LayerNorm and
RMSNorm outputs, 1 + scale, the GELU output, SiLU(h1) and its product with h2) these kernels
round at the same point, so they compute what ComfyUI's block computes up to the order of fp32
sums; the activations are then quantized from fp32, not from a rounded copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import direct, fp8_codes, fp8_row_scale, next_pow2, sm_count


@triton.jit
def _rounded(x, like_ptr):
    """fp32 x rounded to the element type of like_ptr (the compute dtype), back in fp32."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _ln_mod_quant_kernel(x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr, K, rows_per_batch,
                         stride_xm, stride_mb, stride_qm, eps, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / K
    d = tl.where(mask, x - mean, 0.0)
    xn = _rounded(d * tl.rsqrt(tl.sum(d * d, 0) / K + eps), x_ptr)
    b = row // rows_per_batch
    shift = tl.load(shift_ptr + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
    y = xn * _rounded(1.0 + scale, x_ptr) + shift
    s = fp8_row_scale(tl.max(tl.abs(y), 0))
    q = fp8_codes(y, s, q_ptr)
    tl.store(q_ptr + row * stride_qm + cols, q, mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _gelu_tanh(h):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits for large |u| (exp -> inf or 0)
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    return 0.5 * h * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def _gelu_quant_kernel(a_ptr, h_ptr, q_ptr, s_ptr, KA, KH, stride_am, stride_hm, stride_qm,
                       BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ca = tl.arange(0, BLOCK_A)
    ma = ca < KA
    a = tl.load(a_ptr + row * stride_am + ca, mask=ma, other=0.0).to(tl.float32)
    ch = tl.arange(0, BLOCK_H)
    mh = ch < KH
    h = tl.load(h_ptr + row * stride_hm + ch, mask=mh, other=0.0).to(tl.float32)
    g = _rounded(_gelu_tanh(h), h_ptr)  # GELU(0) = 0: masked lanes stay 0 for the amax
    s = fp8_row_scale(tl.maximum(tl.max(tl.abs(a), 0), tl.max(tl.abs(g), 0)))
    q = q_ptr + row * stride_qm
    tl.store(q + ca, fp8_codes(a, s, q_ptr), mask=ma)
    tl.store(q + KA + ch, fp8_codes(g, s, q_ptr), mask=mh)
    tl.store(s_ptr + row, s)


@triton.jit
def _swiglu_chunk(h_row, cols, KH, like_ptr):
    """SiLU(h1) * h2 at columns `cols` of one row h = [h1 | h2] (each KH wide), rounded where
    ComfyUI's SiLUActivation rounds (silu's output, then the product); masked lanes are 0."""
    m = cols < KH
    x1 = tl.load(h_row + cols, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(h_row + KH + cols, mask=m, other=0.0).to(tl.float32)
    return _rounded(_rounded(x1 / (1.0 + tl.exp(-x1)), like_ptr) * x2, like_ptr)


@triton.jit
def _swiglu_quant_kernel(a_ptr, h_ptr, q_ptr, s_ptr, M, KA, KH, stride_am, stride_hm, stride_qm,
                         CH: tl.constexpr):
    # FLUX.2's rows (up to 6144 + 2 x 18432 wide) do not fit one register tile: each row is read
    # in CH-wide chunks twice, once for its |max|, once to write the codes.
    # Programs loop over rows, a grid of a few per SM.
    cols = tl.arange(0, CH)
    for r in range(tl.program_id(0).to(tl.int64), M, tl.num_programs(0)):  # int64 offsets below
        a_row = a_ptr + r * stride_am
        h_row = h_ptr + r * stride_hm
        amax = 0.0
        for k0 in range(0, KA, CH):
            a = tl.load(a_row + k0 + cols, mask=k0 + cols < KA, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), 0))
        for k0 in range(0, KH, CH):
            amax = tl.maximum(amax, tl.max(tl.abs(_swiglu_chunk(h_row, k0 + cols, KH, h_ptr)), 0))
        s = fp8_row_scale(amax)
        q_row = q_ptr + r * stride_qm
        for k0 in range(0, KA, CH):
            c = k0 + cols
            a = tl.load(a_row + c, mask=c < KA, other=0.0).to(tl.float32)
            tl.store(q_row + c, fp8_codes(a, s, q_ptr), mask=c < KA)
        for k0 in range(0, KH, CH):
            c = k0 + cols
            tl.store(q_row + KA + c, fp8_codes(_swiglu_chunk(h_row, c, KH, h_ptr), s, q_ptr), mask=c < KH)
        tl.store(s_ptr + r, s)


@triton.jit
def _rms_rope(src, w_ptr, f00, f01, f10, f11, hh, hm, eps, BH: tl.constexpr, D: tl.constexpr):
    """[BH, D] heads of q or k: RMSNorm * weight (rounded to src's dtype like ComfyUI's rms_norm
    output), then each (even, odd) lane pair rotated by its 2x2 RoPE matrix, in fp32.
    Contiguous loads and stores; the pairs come from a [BH, D/2, 2] view (strided even/odd
    loads ran this kernel 8x slower on the H100)."""
    d = tl.arange(0, D)
    x = tl.load(src + hh[:, None] * D + d[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    n = _rounded(x * r * tl.load(w_ptr + d).to(tl.float32)[None, :], src)
    ne, no = tl.split(tl.reshape(n, (BH, D // 2, 2)))
    return tl.reshape(tl.join(f00 * ne + f01 * no, f10 * ne + f11 * no), (BH, D))


@triton.jit
def _qk_norm_rope_kernel(src_ptr, qw_ptr, kw_ptr, pe_ptr, q_ptr, k_ptr, v_ptr, L, H,
                         stride_sb, stride_sl, stride_pb, stride_pl, stride_ob, stride_oh, stride_ol,
                         tok_off, eps_q, eps_k, D: tl.constexpr, BH: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // L
    tok = pid % L
    hh = tl.arange(0, BH)
    hm = hh < H
    i = tl.arange(0, D // 2)
    d = tl.arange(0, D)
    src = src_ptr + b * stride_sb + tok * stride_sl  # [3, H, D]: q, k, v of this token
    f = pe_ptr + b * stride_pb + (tok_off + tok) * stride_pl + 4 * i  # [D/2, 2, 2] rotations
    f00 = tl.load(f)[None, :]
    f01 = tl.load(f + 1)[None, :]
    f10 = tl.load(f + 2)[None, :]
    f11 = tl.load(f + 3)[None, :]
    dst = b * stride_ob + hh[:, None] * stride_oh + (tok_off + tok) * stride_ol + d[None, :]
    m = hm[:, None]
    q = _rms_rope(src, qw_ptr, f00, f01, f10, f11, hh, hm, eps_q, BH, D)
    tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=m)
    k = _rms_rope(src + H * D, kw_ptr, f00, f01, f10, f11, hh, hm, eps_k, BH, D)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=m)
    v = tl.load(src + 2 * H * D + hh[:, None] * D + d[None, :], mask=m, other=0.0)
    tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride (a view where the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _warps(block: int) -> int:
    # H100, 4608 rows: K=3072 (block 4096) 25 us with 4 warps vs 29 with 8; K=12288 91 us with
    # 8 vs 95 with 16 (measured 2026-11-28)
    return 4 if block <= 4096 else 8


def ln_mod_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                 code_dtype=torch.float8_e4m3fn):
    """x [B, L, K]; shift, scale [B, 1, K] (views of the modulation output) ->
    (fp8 e4m3 [B*L, K], fp32 row scales [B*L, 1]) of layer_norm(x) * (1 + scale) + shift.
    code_dtype=torch.float32 returns the scaled values before the e4m3 rounding (tests)."""
    bsz, length, k = x.shape
    if shift.shape != (bsz, 1, k) or scale.shape != (bsz, 1, k) or shift.stride() != scale.stride():
        raise ValueError(f"ln_mod_quant: shift {tuple(shift.shape)} / scale {tuple(scale.shape)} do not "
                         f"modulate x {tuple(x.shape)}")
    x2 = _rows(x)
    q = torch.empty(x2.shape, device=x.device, dtype=code_dtype)
    s = torch.empty((x2.shape[0], 1), device=x.device, dtype=torch.float32)
    block = next_pow2(k)
    direct(_ln_mod_quant_kernel)((x2.shape[0],), (x2, shift, scale, q, s, k, length, x2.stride(0), shift.stride(0),
                                                  q.stride(0), eps), dict(BLOCK_K=block, num_warps=_warps(block)))
    return q, s


def _prefixed_outputs(name: str, h2: torch.Tensor, prefix: torch.Tensor | None, width: int, code_dtype):
    """(prefix rows [M, KA], codes [M, KA + width], row scales [M, 1]) of a [prefix | f(h)] kernel."""
    m = h2.shape[0]
    a2 = _rows(prefix) if prefix is not None else h2[:, :0]
    if a2.shape[0] != m:
        raise ValueError(f"{name}: prefix has {a2.shape[0]} rows, h has {m}")
    q = torch.empty((m, a2.shape[1] + width), device=h2.device, dtype=code_dtype)
    return a2, q, torch.empty((m, 1), device=h2.device, dtype=torch.float32)


def gelu_quant(h: torch.Tensor, prefix: torch.Tensor | None = None, code_dtype=torch.float8_e4m3fn):
    """[prefix | gelu_tanh(h)] along the last dim -> (fp8 [M, KA + KH], fp32 row scales [M, 1]).
    code_dtype as in ln_mod_quant."""
    h2 = _rows(h)
    m, kh = h2.shape
    a2, q, s = _prefixed_outputs("gelu_quant", h2, prefix, kh, code_dtype)
    ka = a2.shape[1]
    ba, bh = max(16, next_pow2(ka)), next_pow2(kh)
    direct(_gelu_quant_kernel)((m,), (a2, h2, q, s, ka, kh, a2.stride(0), h2.stride(0), q.stride(0)),
                               dict(BLOCK_A=ba, BLOCK_H=bh, num_warps=_warps(ba + bh)))
    return q, s


# H200, FLUX.2-dev widths, 4608 rows (2026-11-29, device run 5): 186 / 226 us without / with the
# 6144-wide prefix, against 552 / 679 us for ComfyUI's chunk, silu, mul and our act_quant. Fewer
# programs per SM ran slower (1: 2-4x): loads in flight matter more here than L2 hits
SWIGLU_CHUNK, SWIGLU_WARPS, SWIGLU_PROGRAMS_PER_SM = 2048, 8, 8


def _programs(device: torch.device) -> int:
    """Programs for a row-looping kernel: a few per SM; 2 on the CPU interpreter, so its tests
    loop."""
    return sm_count(device) * SWIGLU_PROGRAMS_PER_SM if device.type == "cuda" else 2


def swiglu_quant(h: torch.Tensor, prefix: torch.Tensor | None = None, code_dtype=torch.float8_e4m3fn):
    """[prefix | silu(h1) * h2] along the last dim, h = [h1 | h2] (ComfyUI's SiLUActivation:
    h.chunk(2, -1)) -> (fp8 [M, KA + KH/2], fp32 row scales [M, 1]). code_dtype as in ln_mod_quant."""
    h2 = _rows(h)
    m, width = h2.shape
    if width % 2:
        raise ValueError(f"swiglu_quant: h is {width} wide, not two equal halves")
    kh = width // 2
    a2, q, s = _prefixed_outputs("swiglu_quant", h2, prefix, kh, code_dtype)
    if m:
        direct(_swiglu_quant_kernel)((min(m, _programs(h.device)),),
                                     (a2, h2, q, s, m, a2.shape[1], kh, a2.stride(0), h2.stride(0), q.stride(0)),
                                     dict(CH=SWIGLU_CHUNK, num_warps=SWIGLU_WARPS))
    return q, s


def qk_norm_rope(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps_q: float, eps_k: float, pe: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, tok_off: int) -> None:
    """qkv [B, L, 3*H*D] (rows may be strided: a slice of a wider GEMM output) -> q, k normed and
    rotated, v copied, into q/k/v [B, H, L_all, D] at tokens tok_off .. tok_off + L.
    pe: ComfyUI's rotations [B or 1, 1, L_all, D/2, 2, 2] fp32."""
    bsz, length, width = qkv.shape
    d = width // (3 * heads)
    if qkv.stride(2) != 1 or width != 3 * heads * d or d % 2 or (d & (d - 1)):
        raise ValueError(f"qk_norm_rope: qkv {tuple(qkv.shape)} is not [B, L, 3 * {heads} * D] with D a power of two")
    if q.shape != k.shape or q.shape != v.shape or q.shape[0] != bsz or q.shape[1] != heads or q.shape[3] != d \
            or tok_off + length > q.shape[2] or q.stride() != k.stride() or q.stride() != v.stride() or q.stride(3) != 1:
        raise ValueError(f"qk_norm_rope: outputs {tuple(q.shape)} do not hold [B, {heads}, >= {tok_off + length}, {d}]")
    if pe.dim() != 6 or pe.shape[2] < tok_off + length or pe.shape[3:] != (d // 2, 2, 2) or pe.shape[0] not in (1, bsz):
        raise ValueError(f"qk_norm_rope: pe {tuple(pe.shape)} is not [B, 1, >= {tok_off + length}, {d // 2}, 2, 2]")
    if pe.dtype != torch.float32 or pe.stride(5) != 1 or pe.stride(4) != 2 or pe.stride(3) != 4:
        pe = pe.float().contiguous()
    stride_pb = pe.stride(0) if pe.shape[0] > 1 else 0
    direct(_qk_norm_rope_kernel)((bsz * length,), (qkv, q_weight, k_weight, pe, q, k, v, length, heads,
                                                   qkv.stride(0), qkv.stride(1), stride_pb, pe.stride(2),
                                                   q.stride(0), q.stride(1), q.stride(2), tok_off, eps_q, eps_k),
                                 dict(D=d, BH=next_pow2(heads), num_warps=4))
