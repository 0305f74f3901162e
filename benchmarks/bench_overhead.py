"""Host (CPU) time per linear call, the cost that decides a step once GPU work is fast.

Runs each call N times back to back at a small M (GPU work of a few microseconds, so the host
is the bottleneck) and reports wall time per call; the GPU is synchronized only at the end.
    python benchmarks/bench_overhead.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()
from comfyui_nvfp4.kernels import registry  # noqa: E402
from comfyui_nvfp4.kernels.module import NVFP4LinearModule  # noqa: E402
from comfyui_nvfp4.quant import nvfp4  # noqa: E402
from comfyui_nvfp4.quant.layers import NVFP4Linear  # noqa: E402


def per_call_us(fn, n=2000, wait_for_gpu=True):
    """Wall time per call of n back-to-back calls. wait_for_gpu=False stops the clock before the
    GPU has drained: the host's own time per call even where the GPU is the slower side."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if wait_for_gpu:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    from comfyui_nvfp4.kernels.triton_fp8 import act_quant_fp8
    dev = torch.device("cuda")
    m, k, n = 64, 3072, 3072
    mod = NVFP4LinearModule(k, n, bias=True)
    mod.set_layer(NVFP4Linear([nvfp4.quantize(torch.randn(n, k) / k ** 0.5)], torch.zeros(n, dtype=torch.bfloat16)))
    fp8 = registry.get("fp8")
    mod.set_prepared("fp8", fp8.prepare(mod))
    mod.to(dev)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w_bf16 = mod.canonical().dequantize(torch.bfloat16)
    bias = mod.bias
    w8, ws = mod.prep_fp8_w, mod.prep_fp8_ws.view(1, -1)
    q, xs = act_quant_fp8(x)
    rows = {
        "bf16 F.linear (baseline)": lambda: torch.nn.functional.linear(x, w_bf16, bias),
        "act_quant_fp8 (Triton launch)": lambda: act_quant_fp8(x),
        "torch._scaled_mm rowwise + bias": lambda: torch._scaled_mm(q, w8.t(), scale_a=xs, scale_b=ws, bias=bias,
                                                                    out_dtype=torch.bfloat16, use_fast_accum=True),
        "torch._scaled_mm rowwise, no bias": lambda: torch._scaled_mm(q, w8.t(), scale_a=xs, scale_b=ws,
                                                                      out_dtype=torch.bfloat16, use_fast_accum=True),
        "fp8 backend.run (module)": lambda: fp8.run(mod, x),
        "module forward (fp8)": lambda: mod(x),
    }
    mod.backend = "fp8"
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  M,K,N = {m},{k},{n}")
    print("| call | host us per call |")
    print("|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {per_call_us(fn):.1f} |")
    if "--profile" in sys.argv:  # where the host time of one module call goes
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            mod(x)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
