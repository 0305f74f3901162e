"""fp8 and w4a16 kernels on a real GPU: fresh random inputs, poisoned outputs, odd shapes, M = 1."""
import pytest
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.module import NVFP4LinearModule
from comfyui_nvfp4.kernels.portable import EMULATE
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import NVFP4Linear

DEV = torch.device("cuda")
SHAPES = [(1, 64, 64), (1, 3072, 3072), (5, 136, 80), (16, 1000, 304), (130, 272, 96), (4096, 512, 1024),
          (333, 3072, 9216)]


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
        assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w4a16_matches_dequant_reference_and_writes_every_element(m, n, k):
    from comfyui_nvfp4.kernels.triton_kernels import w4a16_gemm
    mod = module(n, k)
    p = mod.parts(DEV)[0]
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)  # poisoned
    w4a16_gemm(x, p.packed, p.block_scale, p.global_scale, mod.bias.to(DEV), out)
    assert torch.isfinite(out).all()
    assert rel(out, reference(mod.to(DEV), x)) < 1e-2


@pytest.mark.parametrize("backend", ["w4a16", "fp8"])
@pytest.mark.parametrize("parts", [1, 2])
def test_backend_on_module(backend, parts):
    b = registry.get(backend)
    ok, why = b.capability(DEV)
    if not ok:
        pytest.skip(why)
    for m, n, k in [(1, 3072, 3072), (77, 384, 128), (1024, 1152, 1024)]:
        mod = module(n, k, parts=parts)
        if b.prepares:
            mod.set_prepared(backend, b.prepare(mod))
        mod.to(DEV)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        y = b.run(mod, x)
        assert mod.last_path == backend and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        ref = reference(mod, x)
        err = rel(y, ref)
        emu = rel(EMULATE.run(mod, x.float()), ref)
        if backend == "fp8":
            assert err < 0.04 and err < emu / 2, (err, emu)
        else:
            assert err < 1e-2, err


def test_fp8_prepare_is_exact_per_channel():
    from comfyui_nvfp4.kernels.hopper import fp8_weight
    mod = module(256, 512, parts=2)
    q, s = fp8_weight(mod.parts(DEV), DEV)
    w = mod.canonical().dequantize(torch.float32, DEV)
    assert torch.allclose(s, w.abs().amax(1) / 448)
    assert rel(q.float() * s[:, None], w) < 0.03
