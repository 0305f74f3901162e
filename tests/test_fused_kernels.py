"""The fused-block kernels (kernels/triton_fused.py) against torch written out op by op, the way
ComfyUI's FLUX.1 and FLUX.2 blocks compute them, run on the CPU by Triton's interpreter.

The interpreter's float -> bf16 casts do not round to nearest and its float -> fp8 casts are
wrong (tests/test_triton_interpreter.py), so the quantizing kernels write their scaled values
before the e4m3 cast (code_dtype=float32) and bf16 outputs are compared within a few bf16
steps. tests/gpu checks the same kernels with the real casts, and the fused blocks against
ComfyUI's own blocks.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is present: the kernels are tested for real in tests/gpu", allow_module_level=True)

from comfyui_nvfp4.kernels import triton_fused  # noqa: E402


def assert_fp8_rows(q, s, ref):
    """q (scaled values, fp32) * s (row scales) is ref [M, K] with scale = amax / 448, up to the
    bf16 roundings inside the kernel (ref rounds at the same points)."""
    assert q.dtype == torch.float32
    torch.testing.assert_close(s, ref.abs().amax(1, keepdim=True) / 448, rtol=2e-2, atol=0)
    torch.testing.assert_close(q * s, ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))
    assert q.abs().max() <= 448


def bf16_close(a, b):
    """Equal up to a few truncated bf16 roundings (relative to the largest value: RoPE pairs
    can cancel to ~0, where any rounding is a large relative error)."""
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * float(b.float().abs().max()))
    return True


@pytest.mark.parametrize("bsz,length,k,dtype", [(1, 7, 96, torch.bfloat16), (2, 5, 200, torch.bfloat16),
                                               (2, 3, 64, torch.float16)])
def test_ln_mod_quant_is_layernorm_modulation_then_token_fp8(bsz, length, k, dtype):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(bsz, length, k, generator=g) * 4 + 1).to(dtype)
    mod = (torch.randn(bsz, 1, 3 * k, generator=g) * 0.5).to(dtype)  # a Modulation output: chunks are views
    shift, scale = mod[..., :k], mod[..., k:2 * k]
    q, s = triton_fused.ln_mod_quant(x, shift, scale, 1e-6, code_dtype=torch.float32)
    # ComfyUI: LayerNorm (compute dtype out), then addcmul(shift, x, 1 + scale) in that dtype
    ref = torch.addcmul(shift.float(), F.layer_norm(x, (k,), eps=1e-6).float(), (1 + scale).float())
    assert q.shape == (bsz * length, k) and s.shape == (bsz * length, 1)
    assert_fp8_rows(q, s, ref.reshape(-1, k))


def test_ln_mod_quant_rejects_modulation_of_another_width():
    x = torch.randn(1, 4, 64).bfloat16()
    with pytest.raises(ValueError, match="do not modulate"):
        triton_fused.ln_mod_quant(x, torch.zeros(1, 1, 32).bfloat16(), torch.zeros(1, 1, 32).bfloat16())


@pytest.mark.parametrize("prefix", [0, 48])
def test_gelu_quant_is_cat_prefix_gelu_then_token_fp8(prefix):
    g = torch.Generator().manual_seed(prefix)
    wide = (torch.randn(2, 3, 500, generator=g) * 3).bfloat16()
    h = wide[..., 180:]  # strided rows, like the MLP half of a single block's linear1 output
    a = (torch.randn(2, 3, prefix, generator=g) * 5).bfloat16() if prefix else None
    q, s = triton_fused.gelu_quant(h, prefix=a, code_dtype=torch.float32)
    parts = ([a] if prefix else []) + [F.gelu(h, approximate="tanh")]
    ref = torch.cat(parts, -1).float().reshape(6, -1)
    assert q.shape == (6, prefix + 320)
    assert_fp8_rows(q, s, ref)


def test_gelu_tanh_saturates_without_nan():
    h = torch.tensor([[-1e4, -50.0, -5.0, 0.0, 5.0, 50.0, 1e4, 3e38]]).bfloat16()
    q, s = triton_fused.gelu_quant(h, code_dtype=torch.float32)
    ref = F.gelu(h.float(), approximate="tanh")
    assert torch.isfinite(q.float()).all()
    assert_fp8_rows(q, s, ref)


def swiglu_ref(h):
    """ComfyUI's SiLUActivation in the compute dtype: chunk, silu (rounded), times h2 (rounded)."""
    h1, h2 = h.chunk(2, dim=-1)
    return F.silu(h1) * h2


@pytest.mark.parametrize("prefix,rows", [(0, 7), (48, 5), (200, 3)])
def test_swiglu_quant_is_cat_prefix_silu_gate_then_token_fp8(prefix, rows, monkeypatch):
    # chunks of 64 columns: rows of several chunks and a ragged last one, on 2 programs looping
    # over the rows (the interpreter's grid)
    monkeypatch.setattr(triton_fused, "SWIGLU_CHUNK", 64)
    g = torch.Generator().manual_seed(prefix + rows)
    wide = (torch.randn(rows, 3 * 96 + 40, generator=g) * 3).bfloat16()
    h = wide[:, 40:40 + 2 * 96]  # strided rows, like the MLP part of a FLUX.2 single block's linear1 output
    a = (torch.randn(rows, prefix, generator=g) * 5).bfloat16() if prefix else None
    q, s = triton_fused.swiglu_quant(h, prefix=a, code_dtype=torch.float32)
    ref = torch.cat(([a] if prefix else []) + [swiglu_ref(h)], -1).float()
    assert q.shape == (rows, prefix + 96) and s.shape == (rows, 1)
    assert_fp8_rows(q, s, ref)


def test_swiglu_quant_keeps_rows_apart_and_saturates_without_nan():
    # row 0's huge gate must not set row 1's scale; silu of large negatives is -0, not NaN
    h = torch.tensor([[3e4, -1e4, -80.0, 0.0, 2.0, 1.0, 1.0, 5.0],
                      [0.5, -0.5, 1.0, -1e4, 1.0, 1.0, -1.0, 1.0]]).bfloat16()
    q, s = triton_fused.swiglu_quant(h, code_dtype=torch.float32)
    ref = swiglu_ref(h).float()
    assert torch.isfinite(q).all()
    assert_fp8_rows(q, s, ref)
    assert float(s[1]) < 1e-2


def test_swiglu_quant_rejects_odd_width_and_mismatched_prefix():
    with pytest.raises(ValueError, match="two equal halves"):
        triton_fused.swiglu_quant(torch.zeros(2, 7).bfloat16())
    with pytest.raises(ValueError, match="prefix has 3 rows"):
        triton_fused.swiglu_quant(torch.zeros(2, 8).bfloat16(), prefix=torch.zeros(3, 4).bfloat16())


def rope_ref(x, pe):
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).bfloat16()


@pytest.mark.parametrize("pe_batch", [1, 2])
def test_qk_norm_rope_writes_normed_rotated_heads_at_offset(pe_batch):
    g = torch.Generator().manual_seed(pe_batch)
    bsz, heads, d, l_txt, length = 2, 3, 16, 4, 5
    qkv = (torch.randn(bsz, length, 3 * heads * d + 7, generator=g) * 2).bfloat16()[..., :3 * heads * d]
    pos = torch.randn(pe_batch, l_txt + length, d // 2, generator=g) * 3
    pe = torch.stack([pos.cos(), -pos.sin(), pos.sin(), pos.cos()], -1).reshape(pe_batch, 1, l_txt + length, d // 2, 2, 2)
    qw, kw = torch.randn(d, generator=g).bfloat16(), torch.randn(d, generator=g).bfloat16()
    q, k, v = [torch.full((bsz, heads, l_txt + length, d), float("nan")).bfloat16() for _ in range(3)]
    triton_fused.qk_norm_rope(qkv, heads, qw, kw, 1e-6, 7.8125e-3, pe, q, k, v, l_txt)
    rq, rk, rv = qkv.view(bsz, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    f = pe[:, :, l_txt:]
    assert bf16_close(q[:, :, l_txt:], rope_ref(F.rms_norm(rq, (d,), qw, 1e-6), f))
    assert bf16_close(k[:, :, l_txt:], rope_ref(F.rms_norm(rk, (d,), kw, 7.8125e-3), f))
    assert torch.equal(v[:, :, l_txt:], rv)
    for t in (q, k, v):  # the text tokens' rows belong to another call
        assert t[:, :, :l_txt].float().isnan().all()


def test_qk_norm_rope_rejects_outputs_too_short():
    qkv = torch.zeros(1, 4, 3 * 2 * 8).bfloat16()
    pe = torch.zeros(1, 1, 4, 4, 2, 2)
    out = [torch.empty(1, 2, 4, 8).bfloat16() for _ in range(3)]
    with pytest.raises(ValueError, match="outputs"):
        triton_fused.qk_norm_rope(qkv, 2, torch.ones(8), torch.ones(8), 1e-6, 1e-6, pe, *out, tok_off=1)
