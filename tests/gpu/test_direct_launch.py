"""Direct launches (kernels/fast_launch.py) on a real GPU: the same results as Triton's own
launches, a new variant where Triton would compile one, launch hooks and CUDA graphs honoured."""
import torch

from comfyui_nvfp4.kernels import registry, triton_common
from comfyui_nvfp4.kernels.triton_common import direct
from comfyui_nvfp4.kernels.module import NVFP4LinearModule
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import NVFP4Linear

DEV = torch.device("cuda")


def w4a16_layer(n=1000, k=384):
    m = NVFP4LinearModule(k, n, bias=True)
    m.set_layer(NVFP4Linear([nvfp4.quantize(torch.randn(n, k) / k ** 0.5)], (torch.randn(n) * 0.1).to(torch.bfloat16)))
    m.to(DEV)
    w4 = registry.get("w4a16")
    m.set_prepared("w4a16", w4.prepare(m))
    return m, w4


def small_m(m, x, out):
    from comfyui_nvfp4.kernels import triton_w4a16
    triton_w4a16.small_m_gemm(x, m.prep("w4a16", "w0", DEV), m.prep("w4a16", "s0", DEV), m.t("gscale_0", DEV),
                              m.t("bias", DEV), out)
    return out


def reference(m, x):
    return x.double() @ m.canonical().dequantize(torch.float64, DEV).t() + m.bias.double().to(DEV)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_direct_launch_gives_triton_launch_results_and_new_variants_go_through_triton():
    from comfyui_nvfp4.kernels.triton_w4a16 import _small_m_kernel
    m, _ = w4a16_layer()
    launcher = direct(_small_m_kernel)
    assert launcher.enabled
    launcher.kept.clear()
    x = torch.randn(3, 384, device=DEV, dtype=torch.bfloat16)
    first = small_m(m, x, torch.full((3, 1000), float("nan"), device=DEV, dtype=torch.bfloat16))
    assert len(launcher.kept) == 1  # the first call went through Triton and kept its kernel
    for _ in range(3):  # direct launches: bit-identical to Triton's (the kernel is deterministic)
        again = small_m(m, x, torch.full((3, 1000), float("nan"), device=DEV, dtype=torch.bfloat16))
        assert torch.equal(again, first)
    assert len(launcher.kept) == 1
    assert rel(first, reference(m, x)) < 1e-2
    # x 2 bytes off 16-byte alignment: Triton compiles another variant; so must we not reuse ours
    wide = torch.randn(3, 385, device=DEV, dtype=torch.bfloat16)
    odd = wide[:, 1:]
    assert odd.data_ptr() % 16 != 0
    y = small_m(m, odd, torch.full((3, 1000), float("nan"), device=DEV, dtype=torch.bfloat16))
    assert len(launcher.kept) == 2
    assert rel(y, reference(m, odd)) < 1e-2
    y2 = small_m(m, odd, torch.full((3, 1000), float("nan"), device=DEV, dtype=torch.bfloat16))
    assert torch.equal(y, y2)


def test_every_hot_path_kernel_launches_directly_after_its_first_call():
    from comfyui_nvfp4.kernels import triton_fp8, triton_fused, triton_w4a16
    m, w4 = w4a16_layer(3072, 3072)
    x1 = torch.randn(1, 3072, device=DEV, dtype=torch.bfloat16)
    xs = torch.randn(40, 3072, device=DEV, dtype=torch.bfloat16)
    for _ in range(2):
        w4.run(m, x1)  # small-M kernel
        w4.run(m, xs)  # decode kernel
        triton_fp8.act_quant_fp8(xs)
        h = torch.randn(1, 40, 3072, device=DEV, dtype=torch.bfloat16)
        mod = torch.randn(1, 1, 6144, device=DEV, dtype=torch.bfloat16)
        triton_fused.ln_mod_quant(h, mod[..., :3072], mod[..., 3072:])
        triton_fused.gelu_quant(h)
        triton_fused.swiglu_quant(h)
    for fn in (triton_w4a16._small_m_kernel, triton_w4a16._decode_kernel, triton_fp8._act_quant_fp8_kernel,
               triton_fused._ln_mod_quant_kernel, triton_fused._gelu_quant_kernel, triton_fused._swiglu_quant_kernel):
        launcher = direct(fn)
        assert launcher.enabled and launcher.kept, fn


def test_the_autotuners_pick_is_kept_and_launched_directly():
    from comfyui_nvfp4.kernels import triton_fp8
    n, k = 1000, 384
    mod = NVFP4LinearModule(k, n, bias=True)
    mod.set_layer(NVFP4Linear([nvfp4.quantize(torch.randn(n, k) / k ** 0.5)], (torch.randn(n) * 0.1).to(torch.bfloat16)))
    fp8 = registry.get("fp8")
    mod.set_prepared("fp8", fp8.prepare(mod))
    mod.to(DEV)
    w, ws, b = mod.prep("fp8", "w", DEV), mod.prep("fp8", "ws", DEV), mod.t("bias", DEV)
    x = torch.randn(5, k, device=DEV, dtype=torch.bfloat16)
    before = len(triton_common._PICKED)
    first = triton_fp8.small_m_gemm(x, w, ws, b, torch.bfloat16)  # timed by the autotuner
    assert len(triton_common._PICKED) == before + 1
    picked = triton_fp8._small_m_kernel.best_config.all_kwargs()
    assert picked in triton_common._PICKED.values()
    for _ in range(2):
        assert torch.equal(triton_fp8.small_m_gemm(x, w, ws, b, torch.bfloat16), first)
    assert len(triton_common._PICKED) == before + 1


def test_launch_hooks_see_every_call():
    from triton import knobs
    from comfyui_nvfp4.kernels import triton_fp8
    x = torch.randn(8, 3072, device=DEV, dtype=torch.bfloat16)
    triton_fp8.act_quant_fp8(x)  # kept: the next call would launch directly
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        triton_fp8.act_quant_fp8(x)
    finally:
        if hasattr(chain, "add"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = None
    assert len(seen) == 1


def test_direct_launches_run_on_the_current_stream_and_in_cuda_graphs():
    m, w4 = w4a16_layer(3072, 3072)
    x = torch.randn(1, 3072, device=DEV, dtype=torch.bfloat16)
    want = w4.run(m, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernel queued behind this must still see x
        on_side = w4.run(m, x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, want)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = w4.run(m, static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, w4.run(m, static_x))
    assert not torch.equal(static_y, want)
