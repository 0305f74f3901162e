"""Blackwell layouts and mm_fp4 calls, verified on the CPU by independent read-back."""
import os

import numpy as np
import pytest
import torch

from comfyui_nvfp4.kernels import blackwell, registry
from comfyui_nvfp4.kernels.blackwell_layout import CUDNN, CUTLASS, TRTLLM, padded_dims, prepare_weight, trtllm_row_order
from comfyui_nvfp4.kernels.module import NVFP4LinearModule
from comfyui_nvfp4.kernels.portable import EMULATE
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import NVFP4Linear
from readback import ReadbackOps, dequant_packed, read_swizzled, trtllm_source_row, unshuffle

BACKENDS = [CUDNN, CUTLASS, TRTLLM]
# (M, N, K): N and K off the 32/128 grids, M = 1, K = 16 (one scale column)
SHAPES = [(1, 16, 16), (3, 40, 48), (5, 136, 96), (1, 300, 160), (17, 128, 64), (2, 33, 272), (130, 72, 80)]


def flashinfer_or_fail():
    try:
        import flashinfer  # noqa: F401
        return flashinfer
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("flashinfer-python must be installed in CI (.ci/run installs it)")
        pytest.skip("flashinfer-python not installed")


def make_module(n, k, parts=1, bias=True, seed=0, input_scale=True):
    g = torch.Generator().manual_seed(seed)
    sizes = [n] if parts == 1 else [n // 2, n - n // 2]
    ws = []
    for i, rows in enumerate(sizes):
        # Block magnitudes spread over decades (like real weights' outlier channels), so a scale
        # read from the wrong place is a visible error; parts get different weight_scale_2.
        spread = torch.exp(torch.randn(rows, k // 16, 1, generator=g) * 1.5).expand(rows, k // 16, 16)
        w = torch.randn(rows, k, generator=g) * spread.reshape(rows, k) * (1 + i)
        ws.append(nvfp4.quantize(w, input_scale=(0.7 / 2688) * (1 + i) if input_scale else None))
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    m = NVFP4LinearModule(k, n, bias=bias)
    m.layer_name = f"test_{n}x{k}"
    m.set_layer(NVFP4Linear(ws, b))
    return m


def expected_output(mod, ops, x_dtype=torch.bfloat16):
    """What the GEMM must give for the activations the (emulated) quantizer produced: the read-back
    activations times the CANONICAL weights (decoded independently), times alpha, plus bias."""
    outs = []
    for i, call in enumerate(ops.calls):
        n, k = mod._parameters[f"packed_{i}"].shape[0], mod.in_features
        w = dequant_packed(mod._parameters[f"packed_{i}"].numpy(), mod._parameters[f"scale_{i}"].view(torch.uint8).numpy())
        outs.append(call["A"][:, :k] @ w.T * call["alpha_value"])
    y = torch.from_numpy(np.concatenate(outs, axis=1))
    if mod._parameters.get("bias") is not None:
        y = y + mod.bias.double()
    return y


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_trtllm_row_order_matches_formula_and_is_a_permutation():
    order = trtllm_row_order(256)
    assert sorted(order.tolist()) == list(range(256))
    assert all(order[j] == trtllm_source_row(j) for j in range(256))


@pytest.mark.parametrize("rows", [128, 256, 384])
def test_trtllm_row_shuffle_equals_flashinfer_shuffle_matrix_a(rows):
    fi = flashinfer_or_fail()
    w = torch.randint(0, 256, (rows, 24), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    assert torch.equal(w[trtllm_row_order(rows)], fi.shuffle_matrix_a(w, 128))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(16, 16), (40, 48), (136, 96), (300, 160), (33, 272)])
def test_prepared_layout_reads_back_to_canonical(backend, n, k):
    g = torch.Generator().manual_seed(n * k)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(0, 0x7E, (n, k // 16), generator=g, dtype=torch.uint8)
    prep = prepare_weight(backend, packed, scale.view(torch.float8_e4m3fn))
    np_, kp = padded_dims(backend, n, k)
    assert prep["weight"].shape == (np_, kp // 2)
    assert np_ % (128 if backend == TRTLLM else 32) == 0 and kp % 32 == 0
    assert tuple(prep["scale"].shape) == (-(-np_ // 128) * 128, -(-kp // 16 // 4) * 4)
    w, s = prep["weight"].numpy(), read_swizzled(prep["scale"], np_, kp // 16)
    if backend == TRTLLM:
        w, s = unshuffle(w), unshuffle(s)
    assert np.array_equal(w[:n, : k // 2], packed.numpy()) and not w[n:].any() and not w[:, k // 2:].any()
    assert np.array_equal(s[:n, : k // 16], scale.numpy()) and not s[n:].any() and not s[:, k // 16:].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_backend_gemm_through_readback_equals_emulate(backend, m, n, k):
    mod = make_module(n, k, seed=m + n + k)
    mod.set_prepared(backend, blackwell.CUDNN_BACKEND.__class__(backend, 0).prepare(mod))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ops = ReadbackOps()
    with blackwell.use_ops(ops):
        y = registry.get(backend).run(mod, x)
    assert mod.last_path == backend and y.shape == (m, n) and y.dtype == torch.bfloat16
    assert rel(y, expected_output(mod, ops)) < 5e-3  # the bf16 rounding of the output, nothing else
    # and the whole path agrees with the portable emulation of Blackwell numerics
    assert rel(y, EMULATE.run(mod, x.float())) < 1e-2  # same recipe; bf16 output rounding
    call = ops.calls[0]
    np_, kp = padded_dims(backend, n, k)
    assert call["b"] == (kp // 2, np_) and call["b_strides"] == (1, kp // 2) and call["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_part_layer_and_dynamic_input_scale(backend):
    mod = make_module(96, 64, parts=2, input_scale=False, seed=5)
    mod.set_prepared(backend, registry.get(backend).prepare(mod))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    ops = ReadbackOps()
    with blackwell.use_ops(ops):
        y = registry.get(backend).run(mod, x)
    assert len(ops.calls) == 2  # one GEMM per exact part
    assert ops.calls[0]["alpha_value"] != ops.calls[1]["alpha_value"]
    assert rel(y, expected_output(mod, ops)) < 5e-3
    assert rel(y, EMULATE.run(mod, x.float())) < 1e-2  # same recipe; bf16 output rounding


def test_activation_quantizer_matches_flashinfer_recipe():
    """Our portable activation quantizer (emulate) and the read-back's own numpy version of
    fp4_quantize's recipe agree (the GPU's approximate reciprocals may still flip rare ties)."""
    from comfyui_nvfp4.kernels.act_quant import fake_quantize
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)) * 3
    in_scale = torch.tensor(10.0 / 2688)
    ops = ReadbackOps(check_with_flashinfer=False)
    a, sf = ops.fp4_quantize(x, (1 / in_scale).reshape(1))
    a_deq = torch.from_numpy(dequant_packed(a.numpy(), read_swizzled(sf, 64, 16))) * in_scale.double()
    ours = fake_quantize(x, in_scale).double()
    same = torch.isclose(a_deq, ours, rtol=1e-6, atol=0)
    assert same.float().mean() > 0.999
    assert rel(ours, a_deq) < 1e-3


def test_peer_bugs_are_visible_to_the_readback():
    """Linear scales where 128x4 is expected, or the trtllm shuffle given to cutlass: wrong output."""
    mod = make_module(128, 64, seed=9)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ref = EMULATE.run(mod, x.float())
    good = prepare_weight(CUTLASS, mod.packed_0.data, mod.scale_0.data)
    bad_layouts = {
        "linear scales": {"w0": good["weight"], "s0": mod.scale_0.data.view(torch.uint8).clone()},
        "trtllm shuffle on cutlass": {k[0] + "0": v for k, v in prepare_weight(TRTLLM, mod.packed_0.data,
                                                                               mod.scale_0.data).items()},
    }
    for what, tensors in bad_layouts.items():
        mod.drop_prepared()
        mod.set_prepared(CUTLASS, tensors)
        with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
            y = registry.get(CUTLASS).run(mod, x)
        cos = torch.nn.functional.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0)
        assert cos < 0.5, (what, float(cos))


def test_mm_fp4_arguments_pass_flashinfer_problem_size_rules():
    flashinfer_or_fail()
    mod = make_module(136, 96, seed=2)
    for backend in BACKENDS:
        mod.set_prepared(backend, registry.get(backend).prepare(mod))
        ops = ReadbackOps()
        assert ops.check is not None
        with blackwell.use_ops(ops):
            registry.get(backend).run(mod, torch.randn(3, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16))


def test_trtllm_refuses_fp16_and_all_refuse_fp32():
    mod = make_module(32, 32)
    with pytest.raises(ValueError, match="bf16 only"):
        registry.get(TRTLLM).run(mod, torch.randn(2, 32).half())
    with pytest.raises(ValueError, match="bf16 or fp16"):
        registry.get(CUTLASS).run(mod, torch.randn(2, 32))


def test_blackwell_backends_unavailable_on_cpu_with_reasons():
    av = {a.name: a for a in registry.availability(torch.device("cpu"))}
    for b in BACKENDS:
        assert not av[b].available and "Blackwell" in av[b].reason
    with pytest.raises(registry.BackendUnavailableError) as e:
        registry.resolve("cutlass", torch.device("cpu"))
    assert "CPU" in str(e.value) and "Available here: dequant" in str(e.value)
    assert registry.resolve("auto", torch.device("cpu")).name == "dequant"
