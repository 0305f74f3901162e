"""E2M1 codes, packing, the 128x4 swizzle and the quantizer against independent formulas."""
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_nvfp4.quant import e2m1, nvfp4
from comfyui_nvfp4.quant.swizzle import padded_scale_shape, swizzle_128x4, unswizzle_128x4
from reference import byte_values, e2m1_value, e4m3_to_float, swizzle_offset

ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def test_decode_matches_bit_field_formula():
    for c in range(16):
        assert float(e2m1.decode(torch.tensor([c], dtype=torch.uint8))[0]) == e2m1_value(c)


@pytest.mark.parametrize("low_first", [True, False])
def test_all_256_bytes_unpack_in_both_nibble_orders(low_first):
    vals = e2m1.decode(e2m1.unpack(ALL_BYTES.reshape(256, 1), low_nibble_first=low_first))
    for b in range(256):
        assert tuple(vals[b].tolist()) == byte_values(b, low_first), b


@pytest.mark.parametrize("low_first", [True, False])
def test_pack_is_inverse_of_unpack_for_all_bytes(low_first):
    codes = e2m1.unpack(ALL_BYTES, low_nibble_first=low_first)
    assert torch.equal(e2m1.pack(codes, low_nibble_first=low_first), ALL_BYTES)


def test_nibble_orders_differ_and_swap_converts():
    codes = torch.randint(0, 16, (64, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    lo, hi = e2m1.pack(codes, True), e2m1.pack(codes, False)
    assert not torch.equal(lo, hi)
    assert torch.equal(e2m1.swap_nibbles(lo), hi)
    assert torch.equal(e2m1.swap_nibbles(hi), lo)


def _nearest_even_reference(x: float) -> float:
    """Nearest representable magnitude; on a tie the one whose mantissa bit is 0."""
    mags = [e2m1_value(c) for c in range(8)]
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda i: (abs(mags[i] - a), i & 1))
    return mags[best] * (-1 if x < 0 else 1)


def test_encode_rounds_to_nearest_even_and_saturates():
    rng = random.Random(0)
    mags = [e2m1_value(c) for c in range(8)]
    ties = [(a + b) / 2 for a, b in zip(mags, mags[1:])]
    xs = ties + [-t for t in ties] + [rng.uniform(-8, 8) for _ in range(2000)] + [6.0, 7.5, 1e6, -1e6, 0.0]
    got = e2m1.decode(e2m1.encode(torch.tensor(xs, dtype=torch.float32)))
    for x, g in zip(xs, got.tolist()):
        assert g == _nearest_even_reference(x), x


def test_encode_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        e2m1.encode(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("seed", range(6))
def test_swizzle_matches_offset_formula_for_random_shapes(seed):
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 300), rng.randint(1, 13)
    if seed == 0:
        rows, cols = 128, 4  # aligned case
    s = torch.randint(0, 256, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    sw = swizzle_128x4(s)
    rp, cp = padded_scale_shape(rows, cols)
    assert tuple(sw.shape) == (rp, cp)
    flat = sw.reshape(-1)
    expected = torch.zeros(rp * cp, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            expected[swizzle_offset(r, c, cp)] = s[r, c]
    assert torch.equal(flat, expected)  # padding bytes are zero too
    assert torch.equal(unswizzle_128x4(sw, rows, cols), s)


def test_swizzle_keeps_e4m3_dtype():
    s = torch.rand(130, 5).to(torch.float8_e4m3fn)
    sw = swizzle_128x4(s)
    assert sw.dtype == torch.float8_e4m3fn
    assert torch.equal(unswizzle_128x4(sw, 130, 5).view(torch.uint8), s.view(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 260), cols=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_swizzle_round_trip_property(rows, cols, seed):
    s = torch.randint(0, 256, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(unswizzle_128x4(swizzle_128x4(s), rows, cols), s)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), kb=st.integers(1, 6), seed=st.integers(0, 2**31), low=st.booleans())
def test_pack_round_trip_property(n, kb, seed, low):
    codes = torch.randint(0, 16, (n, kb * 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(e2m1.unpack(e2m1.pack(codes, low), low), codes)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 33), kb=st.integers(1, 5), seed=st.integers(0, 2**31),
       scale=st.floats(1e-4, 1e3))
def test_quantize_is_idempotent_on_its_own_output(n, kb, seed, scale):
    w = torch.randn(n, kb * 16, generator=torch.Generator().manual_seed(seed)) * scale
    q = nvfp4.quantize(w)
    q2 = nvfp4.quantize(q.dequantize(), global_scale=q.global_scale)
    assert torch.equal(q2.packed, q.packed) or torch.equal(q2.dequantize(), q.dequantize())
    assert torch.equal(q2.dequantize(), q.dequantize())


def test_quantize_follows_modelopt_conventions():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    q = nvfp4.quantize(w, input_scale=0.5)
    amax = w.abs().max()
    assert torch.allclose(q.global_scale, amax / (6 * 448))
    blocks = w.reshape(32, 4, 16).abs().amax(-1)
    expected_scale = (blocks / (6 * q.global_scale)).to(torch.float8_e4m3fn)
    assert torch.equal(q.block_scale.view(torch.uint8), expected_scale.view(torch.uint8))
    assert float(q.block_scale.float().max()) == 448.0  # the block holding amax uses the full range
    assert q.input_scale == 0.5
    # Independent dequantization of what quantize produced: float64 by definition.
    sf = e4m3_to_float(q.block_scale.view(torch.uint8).numpy())
    vals = np.array([[e2m1_value(int(c)) for c in row] for row in e2m1.unpack(q.packed).tolist()])
    ref = vals * np.repeat(sf, 16, axis=1) * float(q.global_scale)
    assert np.allclose(q.dequantize().double().numpy(), ref, rtol=1e-6, atol=0)
    rel = (q.dequantize() - w).norm() / w.norm()
    assert 0.05 < rel < 0.15  # NVFP4 on Gaussian data


def test_dequantize_product_is_exact_before_global_scale():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    q = nvfp4.quantize(w)
    one = nvfp4.NVFP4Weight(q.packed, q.block_scale, torch.tensor(1.0))
    d32 = one.dequantize(torch.float32)
    assert torch.equal(one.dequantize(torch.bfloat16).float(), d32)  # e2m1*e4m3 fits bf16 exactly


def test_all_zero_blocks_and_tensors_give_no_nan():
    w = torch.randn(8, 64)
    w[:, :16] = 0
    q = nvfp4.quantize(w)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(q.dequantize()[:, :16], torch.zeros(8, 16))
    z = nvfp4.quantize(torch.zeros(4, 32))
    assert torch.isfinite(z.global_scale) and z.global_scale > 0
    assert torch.equal(z.dequantize(), torch.zeros(4, 32))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="NaN or inf"):
        nvfp4.quantize(torch.full((4, 16), float("inf")))
