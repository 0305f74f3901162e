"""How far below bf16 can a small-M w4a16 GEMM go on this GPU? The floor is reading the layer's
4-bit codes and scales (0.56 bytes a weight) at all. This times hand-written CUDA that only reads
them (read_floor.cu: 16-byte loads all in flight, or TMA bulk copies; no decode, no dot, no K sum)
on grids of 1 to 24 K ranges per 32-column tile, next to bf16 F.linear and our w4a16 kernel
(`choose()`) at M = 1 and 16, in the same run, with L2 emptied before each call both ways
bench_graph can (FLUSHES). Needs nvcc and an SM 9.0 GPU (the bulk copies); compiles in about a
minute. python benchmarks/read_floor.py [--shapes 3072x3072,3072x9216]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from bench_gemm import FLUSHES, bench_graph
from comfyui_nvfp4.kernels import triton_w4a16
from comfyui_nvfp4.quant import nvfp4

MODES = {"ldg": 0, "bulk": 1, "empty": 2}


def build():
    src = (Path(__file__).with_name("read_floor.cu")).read_text()
    return load_inline("nvfp4_read_floor", cpp_sources="void read_floor(torch::Tensor w, torch::Tensor s, "
                       "torch::Tensor out, int64_t mode, int64_t per);", cuda_sources=src, functions=["read_floor"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="3072x3072,3072x9216", help="KxN layers, comma-separated")
    a = ap.parse_args()
    ext = build()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    best = lambda fn, flush: min(bench_graph(fn, reps=10, flush=flush) for _ in range(3)) * 1e3  # noqa: E731
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}  GPU us a call (CUDA graph), best of 3")
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        layer = nvfp4.quantize(torch.randn(n, k, device=dev) / math.sqrt(k))
        codes, scales = triton_w4a16.pack(layer.packed, layer.block_scale)
        w_bf16 = layer.dequantize(torch.bfloat16)
        n_sc = k // triton_w4a16.SUPER_K.value
        mb = (codes.numel() + scales.numel()) / 1e6
        for flush in FLUSHES:
            line = [f"K={k} N={n} ({mb:.2f} MB), L2 emptied by a {flush}:"]
            for m in (1, 16):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                t_bf16 = best(lambda: torch.nn.functional.linear(x, w_bf16), flush)
                t_w4 = best(lambda: triton_w4a16.small_m_gemm(x, codes, scales, layer.global_scale, None, out), flush)
                line.append(f"M={m} bf16 {t_bf16:.2f} (2x: {t_bf16 / 2:.2f}), w4a16 {t_w4:.2f} ({t_bf16 / t_w4:.2f}x);")
            print(" ".join(line), flush=True)
            print("| K ranges a tile | blocks | KB a block | empty | ldg | bulk |")
            print("|---|---|---|---|---|---|")
            for per in (24, 12, 8, 6, 4, 3, 2, 1):
                if n_sc % per:
                    continue
                folds = torch.zeros(n_sc // per, n, device=dev)
                times, results = {}, {}
                for name, mode in MODES.items():
                    ext.read_floor(codes, scales, folds, mode, per)
                    results[name] = folds.clone()
                    times[name] = best(lambda: ext.read_floor(codes, scales, folds, mode, per), flush)
                if not torch.equal(results["ldg"], results["bulk"]):
                    raise SystemExit(f"ldg and bulk read different bytes at {per} superchunks a block")
                print(f"| {n_sc // per} | {n // 32 * n_sc // per} | {per * 2.25:.1f} | {times['empty']:.2f} | "
                      f"{times['ldg']:.2f} | {times['bulk']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
