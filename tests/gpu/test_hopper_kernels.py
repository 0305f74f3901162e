"""fp8 and w4a16 kernels on a real GPU: fresh random inputs, poisoned outputs, odd shapes, M = 1."""
import pytest
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.module import NVFP4LinearModule
from comfyui_nvfp4.kernels.portable import EMULATE
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import NVFP4Linear

DEV = torch.device("cuda")
# (M, N, K): K a multiple of 128 for the w4a16 kernel; odd N; M = 1..4 take the GEMV kernel
SHAPES = [(1, 64, 128), (1, 18432, 3072), (3, 136, 256), (4, 1000, 384), (5, 136, 128), (16, 1000, 384),
          (130, 272, 896), (4096, 512, 1024), (333, 3072, 9216)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def module(n, k, parts=1, bias=True):
    sizes = [n] if parts == 1 else [n // 3, n - n // 3]
    ws = [nvfp4.quantize(torch.randn(r, k) * (1 + i) / k ** 0.5, input_scale=None) for i, r in enumerate(sizes)]
    m = NVFP4LinearModule(k, n, bias=bias)
    m.set_layer(NVFP4Linear(ws, (torch.randn(n) * 0.1).to(torch.bfloat16) if bias else None))
    return m


def reference(m, x):
    """bf16 product of the dequantized weight (what ComfyUI's dequant path computes), in fp64."""
    w = m.canonical().dequantize(torch.float64, DEV)
    y = x.double() @ w.t()
    return y + m.bias.double() if m._parameters.get("bias") is not None else y


def test_act_quant_fp8_one_pass_is_per_token_exact():
    from comfyui_nvfp4.kernels.triton_kernels import act_quant_fp8
    for m, k in [(1, 3072), (7, 3000), (4096, 136), (33, 15360)]:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * torch.rand(m, 1, device=DEV) * 10
        q, s = act_quant_fp8(x)
        amax = x.float().abs().amax(1, keepdim=True)
        assert torch.allclose(s, amax / 448, rtol=1e-6)
        assert (q.float().abs().amax(1, keepdim=True) - 448).abs().max() < 1e-3  # each row's max hits 448
        ref = (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        # the kernel's fp32 division may differ from torch's by an ulp: allow rare 1-step differences
        diff = (q.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w4a16_matches_dequant_reference_and_writes_every_element(m, n, k):
    from comfyui_nvfp4.kernels.triton_kernels import w4a16_gemm
    from comfyui_nvfp4.kernels.w4a16_layout import split_half_pack
    mod = module(n, k)
    p = mod.parts(DEV)[0]
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)  # poisoned
    w4a16_gemm(x, split_half_pack(p.packed), p.block_scale, p.global_scale, mod.bias.to(DEV), out)
    assert torch.isfinite(out).all()
    assert rel(out, reference(mod.to(DEV), x)) < 1e-2


@pytest.mark.parametrize("backend", ["w4a16", "fp8"])
@pytest.mark.parametrize("parts", [1, 2])
def test_backend_on_module(backend, parts):
    b = registry.get(backend)
    ok, why = b.capability(DEV)
    if not ok:
        pytest.skip(why)
    for m, n, k in [(1, 3072, 3072), (3, 384, 256), (77, 384, 128), (1024, 1152, 1024), (9, 64, 80)]:
        mod = module(n, k, parts=parts)
        if b.prepares:
            mod.set_prepared(backend, b.prepare(mod))
        mod.to(DEV)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        y = b.run(mod, x)
        path = mod.last_path
        if backend == "fp8":
            expected = "fp8-gemv" if m <= 4 else "fp8"
        else:
            expected = "w4a16" if k % 128 == 0 else "dequant"  # the kernel needs K % 128 == 0
        assert path == expected
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        ref = reference(mod, x)
        err = rel(y, ref)
        emu = rel(EMULATE.run(mod, x.float()), ref)
        if path == "fp8":
            assert err < 0.04 and err < emu / 2, (err, emu)
        elif path == "fp8-gemv":  # FP8 weights, bf16 activations
            assert err < 0.03, err
        else:
            assert err < 1e-2, err


def test_fp8_prepare_is_exact_per_channel():
    from comfyui_nvfp4.kernels.hopper import fp8_weight
    mod = module(256, 512, parts=2)
    q, s = fp8_weight(mod.parts(DEV), DEV)
    w = mod.canonical().dequantize(torch.float32, DEV)
    base = w.abs().amax(1) / 448
    assert ((s <= base * 1.000001) & (s >= base * 0.5)).all()  # a candidate between amax/448 and half of it
    assert rel(q.float() * s[:, None], w) < 0.027


@pytest.mark.parametrize("backend", ["dequant", "fp8", "w4a16"])
def test_offloaded_and_moved_modules_still_run(backend):
    """What ComfyUI's patchers do to a layer: leave it on the CPU (lowvram/novram offload, the
    input on the GPU), move it to the GPU and back, and load it again for the next prompt."""
    b = registry.get(backend)
    mod = module(384, 256, parts=2)
    if b.prepares:
        mod.set_prepared(backend, b.prepare(mod))
    x = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    y_offloaded = b.run(mod, x)  # parameters on the CPU, fetched per call
    assert all(p.device.type == "cpu" for p in mod.parameters())
    mod.to(DEV)
    y_loaded = b.run(mod, x)
    mod.to("cpu")
    mod.to(DEV)
    y_reloaded = b.run(mod, x)
    assert torch.equal(y_offloaded, y_loaded) and torch.equal(y_loaded, y_reloaded)
