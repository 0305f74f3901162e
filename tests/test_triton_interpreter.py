"""Our Triton kernels' indexing, masking and decoding, run on the CPU by Triton's interpreter.

The interpreter runs the kernel bodies as numpy, so it checks what the kernels compute, not how
fast. Interpreter limits decide what is compared here (Triton 3.8/3.9): its float -> bf16 and
float -> fp8 casts do not round to nearest-even, its bf16 tl.dot returns garbage, and it runs no
inline PTX. So outputs are written in fp32 (exact comparisons); the fp8 tensor-core configs, the
fp8 rounding and the w4a16 tiles' inline-PTX decode are left to tests/gpu (run on the H100). The
w4a16 tiles run here with their plain-op decode and fp32 operands (same indexing, masking and
scaling as on the GPU).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is present: the kernels are tested for real in tests/gpu", allow_module_level=True)

from comfyui_nvfp4.kernels import triton_fp8, triton_w4a16  # noqa: E402
from comfyui_nvfp4.kernels.hopper import SCALE_CANDIDATES, fp8_weight  # noqa: E402
from comfyui_nvfp4.kernels.triton_common import configs_for, row_tile  # noqa: E402
from comfyui_nvfp4.kernels.w4a16_layout import w4a16_pack  # noqa: E402
from comfyui_nvfp4.quant import nvfp4  # noqa: E402


def weight(n, k, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return nvfp4.quantize(torch.randn(n, k, generator=g) * scale / k ** 0.5)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n,k", [(40, 128), (7, 384), (33, 640)])
def test_decode_is_dequantize_exactly(n, k):
    p = weight(n, k, seed=n)
    # written into the middle rows of a larger buffer (a part of a fused layer), poisoned
    raw = p.block_scale.view(torch.uint8).clone()
    raw[::3, ::4] |= 0x80  # negative and zero block scales: folded into the codes by the layout
    raw[1::5, 1::3] = 0
    p = nvfp4.NVFP4Weight(p.packed, raw.view(torch.float8_e4m3fn), p.global_scale)
    buf = torch.full((n + 5, k), float("nan"))
    triton_w4a16.decode(*w4a16_pack(p.packed, p.block_scale), p.global_scale, buf[3:3 + n])
    assert torch.equal(buf[3:3 + n], p.dequantize(torch.float32))
    assert buf[:3].isnan().all() and buf[3 + n:].isnan().all()  # nothing written outside its rows


def test_w4a16_kernels_reject_other_layouts():
    p = weight(8, 256, seed=0)
    codes, scales = w4a16_pack(p.packed, p.block_scale)
    with pytest.raises(ValueError, match="K % 128"):  # canonical codes of a K = 80 layer
        triton_w4a16.decode(torch.zeros(8, 40, dtype=torch.uint8), scales, p.global_scale, torch.empty(8, 80))
    with pytest.raises(ValueError, match="w4a16 layout's codes"):  # canonical codes: rows not padded to 32
        triton_w4a16.small_m_gemm(torch.zeros(1, 256), p.packed, scales, p.global_scale, None, torch.empty(1, 8))
    with pytest.raises(ValueError, match="w4a16 layout's scales"):  # canonical e4m3 scales
        triton_w4a16.small_m_gemm(torch.zeros(1, 256), codes, p.block_scale, p.global_scale, None, torch.empty(1, 8))
    with pytest.raises(ValueError, match="w4a16 layout's scales"):  # a strided view is not the layout
        triton_w4a16.decode(codes, torch.cat([scales, scales], 1)[:, :16], p.global_scale, torch.empty(8, 256))


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split", [1, 2, 3, 16])
def test_w4a16_small_m_every_config(m, split):
    """Every tile, whole and split K (5 superchunks: ranges of 3 + 2, 2 + 2 + 1, and 1 each
    with 11 empty ranges at split 16). A split call sums its ranges' partials in the program that
    arrives last: the output must be the same bits whichever order they finish in (the
    interpreter runs them in grid order, 2 calls here), and the arrival counters must be back at
    zero for the next call."""
    n, k = 72, 640
    p = weight(n, k, seed=m, scale=3.0)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m)).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    ref = x.double() @ p.dequantize(torch.float64).t() + b.double()
    codes, scales = w4a16_pack(p.packed, p.block_scale)
    for cfg in triton_w4a16.CONFIGS:
        out = torch.full((m, n), float("nan"))
        triton_w4a16.small_m_gemm(x, codes, scales, p.global_scale, b, out, config=cfg, split=split)
        assert rel(out, ref) < 1e-5, cfg
        if split > 1:
            assert not any(c.any() for _, c in triton_w4a16._SCRATCH.values()), cfg
            again = torch.full((m, n), float("nan"))
            triton_w4a16.small_m_gemm(x, codes, scales, p.global_scale, b, again, config=cfg, split=split)
            assert torch.equal(again, out), cfg


@pytest.mark.parametrize("m", [1, 3, 4])
def test_fp8_small_m_fma_configs(m):
    n, k = 50, 320  # K not a multiple of the K tile: the masked tail
    w8, ws = fp8_weight([weight(n, k, seed=m)], torch.device("cpu"))
    x = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    ref = x.double() @ (w8.double() * ws.double()[:, None]).t() + b.double()
    configs = [c for c in configs_for(triton_fp8._small_m_kernel, MP=row_tile(m)) if not c["DOT"]]
    assert configs
    for cfg in configs:
        out = triton_fp8.small_m_gemm(x, w8, ws, b, torch.float32, config=cfg)
        assert out.shape == (m, n) and rel(out, ref) < 1e-5, cfg


def test_fp8_small_m_untuned_runs_without_timing():
    """Inside tuning.untuned() (the self-check) the autotuned GEMV runs a config directly: here,
    on the interpreter, where timing configs is impossible."""
    from comfyui_nvfp4.kernels.tuning import untuned
    n, k = 40, 256
    w8, ws = fp8_weight([weight(n, k, seed=4)], torch.device("cpu"))
    x = torch.randn(1, k).to(torch.bfloat16)
    ref = x.double() @ (w8.double() * ws.double()[:, None]).t()
    with untuned():
        out = triton_fp8.small_m_gemm(x, w8, ws, None, torch.float32)
    assert rel(out, ref) < 1e-5


def test_nvfp4_to_fp8_picks_a_candidate_scale_per_row():
    n, k = 24, 512
    p = weight(n, k, seed=3)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.full((n,), float("nan"))
    triton_fp8.nvfp4_to_fp8(p.packed, p.block_scale, p.global_scale, q, s)
    w = p.dequantize()
    base = w.abs().amax(1) / 448
    ratios = s / base
    cands = torch.tensor(SCALE_CANDIDATES)
    assert ((ratios[:, None] - cands[None, :]).abs().min(1).values < 1e-6).all()
    q_ref, s_ref = fp8_weight([p], torch.device("cpu"))
    # the interpreter's fp8 cast truncates where CUDA rounds: errors close to the reference's
    assert rel(q.float() * s[:, None], w) < 1.2 * rel(q_ref.float() * s_ref[:, None], w)


def test_nvfp4_to_fp8_zero_rows_get_unit_scale():
    p = weight(4, 128, seed=0)
    p = nvfp4.NVFP4Weight(p.packed.clone(), p.block_scale, p.global_scale)
    p.packed[1] = 0
    q = torch.empty(4, 128, dtype=torch.float8_e4m3fn)
    s = torch.empty(4)
    triton_fp8.nvfp4_to_fp8(p.packed, p.block_scale, p.global_scale, q, s)
    assert s[1] == 1.0 and (q[1].float() == 0).all()


def test_act_quant_scales_are_row_amax_over_448():
    x = torch.randn(5, 300) * torch.rand(5, 1) * 10
    q, s = triton_fp8.act_quant_fp8(x.to(torch.bfloat16))
    assert torch.allclose(s, x.to(torch.bfloat16).float().abs().amax(1, keepdim=True) / 448, rtol=1e-6)
    assert (q.float().abs().amax(1) > 400).all()


@pytest.mark.parametrize("n,k", [(18432, 3072), (9216, 3072), (3072, 3072), (3072, 12288), (64, 15360), (200, 128)])
def test_w4a16_choice_is_a_tile_that_can_run_m_rows(n, k):
    sms = 132
    n_sc = k // 128
    for m in range(1, triton_w4a16.SMALL_M_MAX + 1):
        tile, split = triton_w4a16.choose(m, n, k, sms)
        assert tile in triton_w4a16.CONFIGS, (m, tile)
        programs = -(-n // tile["BN"])
        assert 1 <= split <= 16 and (split == 1 or n_sc // split >= 3), (m, split)
        assert (tile, split) == triton_w4a16.choose(1, n, k, sms), m  # the one compile_ahead builds
        # the fewest ranges giving 5.5 programs per SM, unless a range would get fewer than 3
        # superchunks or there would be more than 16 ranges
        if split < min(16, n_sc // 3):
            assert programs * split >= 5.5 * sms, (m, programs, split)
        if split > 1:
            assert programs * (split - 1) < 5.5 * sms, (m, programs, split)
    tile = triton_w4a16.token_tile
    assert tile(1, narrow=True) == tile(8, narrow=True) == 8 and tile(9, narrow=True) == 16
    assert tile(1, narrow=False) == tile(8, narrow=False) == 16  # Triton < 3.5: no dot under 16 wide


@pytest.mark.parametrize("n,k", [(37, 384), (64, 128), (5, 256)])
def test_w4a16_pack_kernel_writes_the_reference_layout(n, k):
    """The packing kernel (what the backend prepares with on the GPU) writes the same bytes as
    w4a16_layout.w4a16_pack (read back independently in test_kernels_cpu), for random codes with
    negative, zero and subnormal block scales and rows padded to whole tiles; its refusals are the
    reference's."""
    from test_kernels_cpu import _w4a16_weight
    packed, scale = _w4a16_weight(n, k, seed=n)
    codes, scales = triton_w4a16.pack(packed, scale)
    want_codes, want_scales = w4a16_pack(packed, scale)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    raw = scale.view(torch.uint8).clone()
    raw[n - 1, 2] = 0x7F  # NaN
    with pytest.raises(ValueError, match=f"row {n - 1}, group 2 is NaN"):
        triton_w4a16.pack(packed, raw.view(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="K % 128"):
        triton_w4a16.pack(packed[:, :40], scale[:, :5])


def test_w4a16_backend_runs_a_fused_layer_with_parked_originals():
    """The backend as the node uses it: a layer of two parts whose rows are not whole 32-row tiles
    (each part's w4a16 tensors are padded, the output is not), prepared, its canonical codes and
    scales parked, then run at small M (the tile) and large M (decode + GEMM)."""
    from comfyui_nvfp4.kernels.hopper import W4A16Backend
    from comfyui_nvfp4.kernels.module import NVFP4LinearModule
    from comfyui_nvfp4.quant.layers import NVFP4Linear
    k, rows = 256, (40, 24)
    parts = [weight(r, k, seed=i) for i, r in enumerate(rows)]
    bias = torch.randn(sum(rows)).to(torch.bfloat16)
    m = NVFP4LinearModule(k, sum(rows))
    m.set_layer(NVFP4Linear(parts, bias))
    backend = W4A16Backend()
    m.set_prepared(backend.name, backend.prepare(m))
    m.park(backend.replaces)
    w = torch.cat([p.dequantize(torch.float64) for p in parts])
    for n_tokens, path in ((3, "w4a16"), (20, "w4a16-dq")):
        x = torch.randn(n_tokens, k, generator=torch.Generator().manual_seed(n_tokens)).to(torch.bfloat16)
        y = backend.run(m, x)
        assert m.last_path == path and y.shape == (n_tokens, sum(rows))
        assert rel(y, x.double() @ w.t() + bias.double()) < 1e-2, path


def _variant(kernel, args, options):
    """What picks a compiled variant: the kernel, each tensor's dtype, shape, strides and 16-byte
    alignment, each int, the constexprs and options (ASM aside: no PTX on the interpreter)."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
        return a
    return repr((getattr(kernel, "fn", kernel).__name__, tuple(arg(a) for a in args),
                 sorted((k, v) for k, v in options.items() if k != "ASM")))


def _record_launches(monkeypatch, kernels) -> list:
    """Every launch of these kernels from now on, as _variant sees it (the kernels still run)."""
    seen = []
    for kernel in kernels:
        def run(*args, grid, warmup, _run=kernel.run, _k=kernel, **kwargs):
            seen.append(_variant(_k, args, kwargs))
            return _run(*args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return seen


def _two_part_layer(k, rows, bias):
    from comfyui_nvfp4.kernels.module import NVFP4LinearModule
    from comfyui_nvfp4.quant.layers import NVFP4Linear
    m = NVFP4LinearModule(k, sum(rows), bias=bias is not None)
    m.set_layer(NVFP4Linear([weight(r, k, seed=i) for i, r in enumerate(rows)], bias))
    return m


@pytest.mark.parametrize("backend_name", ["w4a16", "fp8"])
def test_compile_ahead_builds_the_launches_the_backend_makes(monkeypatch, backend_name):
    """compile_ahead builds its launches on meta tensors; they must be the variants the backend's
    real calls launch (else preparation would compile again). The real launches are recorded (the
    kernels still run) on a layer of two parts whose second starts at an unaligned row/column (66:
    132 bytes of bf16), as the self-check runs it: untuned, at SELF_CHECK_ROWS rows and at one.
    The CPU prepares with torch, so the preparation kernels (pack, conversion) are left out here;
    tests/gpu checks that nothing at all compiles after compile_ahead."""
    from comfyui_nvfp4.kernels import registry
    from comfyui_nvfp4.kernels.preparation import SELF_CHECK_ROWS
    from comfyui_nvfp4.kernels.triton_common import LayerShape
    from comfyui_nvfp4.kernels.tuning import untuned
    k, rows = 256, (66, 134)
    if backend_name == "w4a16":
        kernels = [triton_w4a16._decode_kernel, triton_w4a16._small_m_kernel]
        ahead_of = lambda shape: triton_w4a16.preparation_launches(shape, torch.device("cpu"))  # noqa: E731
    else:
        kernels = [triton_fp8._act_quant_fp8_kernel, triton_fp8._small_m_kernel.fn]
        ahead_of = lambda shape: triton_fp8.preparation_launches(shape, SELF_CHECK_ROWS)  # noqa: E731
    backend = registry.get(backend_name)
    for bias in (torch.randn(sum(rows)).to(torch.bfloat16), None):
        m = _two_part_layer(k, rows, bias)
        m.set_prepared(backend.name, backend.prepare(m))
        real = _record_launches(monkeypatch, kernels)
        x = torch.randn(SELF_CHECK_ROWS, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with untuned():
            backend.run(m, x[:1])
            backend.run(m, x)
        monkeypatch.undo()
        shape = LayerShape(rows, k, bias is not None)
        assert shape == LayerShape.of(m)
        ahead = [_variant(lc.kernel, lc.args, lc.options) for lc in ahead_of(shape)
                 if getattr(lc.kernel, "fn", lc.kernel) in {getattr(kk, "fn", kk) for kk in kernels}]
        assert real and sorted(real) == sorted(ahead), (real, ahead)
        if backend_name == "w4a16":
            assert len(real) == 4 and "False" in "".join(real)  # the unaligned part was among them


def test_fp8_layer_whose_n_is_no_multiple_of_16_runs_fp8_dq(monkeypatch, caplog):
    """torch._scaled_mm refuses N or K not multiples of 16 on CUDA (a RuntimeError, not cuBLASLt's
    NOT_SUPPORTED): such a layer must run 'fp8-dq' above 16 rows, not fail preparation's check,
    and say so once for the layer, whatever M comes."""
    import logging
    from comfyui_nvfp4.kernels import hopper, registry
    monkeypatch.setattr(hopper, "_SCALED_MM_REJECTED", set())  # nothing remembered from earlier tests
    m = _two_part_layer(256, (66, 134), torch.randn(200).to(torch.bfloat16))
    backend = registry.get("fp8")
    m.set_prepared(backend.name, backend.prepare(m))
    ref_w = m.canonical().dequantize(torch.float64).t()
    with caplog.at_level(logging.WARNING, logger="comfyui_nvfp4"):
        for rows in (32, 80):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            y = backend.run(m, x)
            assert m.last_path == "fp8-dq"
            assert rel(y, x.double() @ ref_w + m.bias.double()) < 0.04
    assert caplog.text.count("needs N and K multiples of 16, this layer is N=200 K=256") == 1
