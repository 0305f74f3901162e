"""Host (CPU) time per call of the hot paths: what decides an eager step once GPU work is fast.

Each call runs 400 times back to back while the GPU sleeps in a long torch.cuda._sleep queued
first, so the clock measures the host alone (launches queue, none waits for the GPU); median of 5
such runs, the spread next to it. Baseline from the same run: bf16 F.linear's host time.
Shapes: FLUX.1-dev's 3072 -> 9216 (single-block modulation) at one row through the module (the
node's path), the fused blocks' kernels over 4608 tokens x 3072, the fp8 GEMM at 64 rows.
    python benchmarks/bench_overhead.py [--profile]
(--profile: cProfile of the w4a16 and fp8 one-row module calls: where their host time goes.)
Another commit's package on PYTHONPATH (comfyui_nvfp4) is measured instead of this checkout's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()
from comfyui_nvfp4.kernels import registry, triton_fp8, triton_fused  # noqa: E402
from comfyui_nvfp4.kernels.module import NVFP4LinearModule  # noqa: E402
from comfyui_nvfp4.quant import nvfp4  # noqa: E402
from comfyui_nvfp4.quant.layers import NVFP4Linear  # noqa: E402

CALLS = 400


def host_us(fn) -> float:
    """Host time per call: CALLS calls queued behind a GPU sleep (~0.2 s), clock stopped before
    the GPU drains."""
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / CALLS * 1e6


def main():
    ap = argparse.ArgumentParser(description="host time per call of the hot paths")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the w4a16 and fp8 one-row module calls: where their host time goes")
    a = ap.parse_args()
    dev = torch.device("cuda")
    k, n = 3072, 9216
    mod = NVFP4LinearModule(k, n, bias=True)
    mod.set_layer(NVFP4Linear([nvfp4.quantize(torch.randn(n, k) / k ** 0.5)], torch.randn(n, dtype=torch.bfloat16)))
    mod.to(dev)
    for b in ("fp8", "w4a16"):
        mod.set_prepared(b, registry.get(b).prepare(mod))
    x1 = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    x64 = torch.randn(64, k, device=dev, dtype=torch.bfloat16)
    tokens = torch.randn(1, 4608, k, device=dev, dtype=torch.bfloat16)
    shift_scale = torch.randn(1, 1, 2 * k, device=dev, dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    bias = mod.t("bias", dev)

    def forward(backend, x):
        def call():
            mod.backend = backend
            return mod(x)
        return call

    rows = {
        "bf16 F.linear, 1 row (baseline)": lambda: torch.nn.functional.linear(x1, w_bf16, bias),
        "w4a16 module call, 1 row": forward("w4a16", x1),
        "fp8 module call, 1 row (fp8-gemv)": forward("fp8", x1),
        "fp8 module call, 64 rows (act quant + _scaled_mm)": forward("fp8", x64),
        "act_quant_fp8, 4608 x 3072": lambda: triton_fp8.act_quant_fp8(tokens[0]),
        "ln_mod_quant, 4608 x 3072": lambda: triton_fused.ln_mod_quant(tokens, shift_scale[..., :k],
                                                                        shift_scale[..., k:]),
        "gelu_quant, 4608 x 3072": lambda: triton_fused.gelu_quant(tokens),
    }
    import comfyui_nvfp4
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}; package {Path(comfyui_nvfp4.__file__).parent}")
    print("| call | host us per call (median of 5) | min-max |")
    print("|---|---|---|")
    for name, fn in rows.items():
        runs = sorted(host_us(fn) for _ in range(5))
        print(f"| {name} | {runs[2]:.1f} | {runs[0]:.1f}-{runs[-1]:.1f} |", flush=True)
    if a.profile:
        import cProfile
        import pstats
        for name in ("w4a16 module call, 1 row", "fp8 module call, 1 row (fp8-gemv)"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(2000):
                rows[name]()
            torch.cuda.synchronize()
            pr.disable()
            print(f"--- {name}")
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
