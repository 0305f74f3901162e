"""Per-GEMM benchmark of any registered backends on FLUX.1-dev shapes, on the current GPU.

For each (M, K, N): bf16 F.linear with bias (the baseline, same run) and each backend (weight
preparation excluded, activation quantization included): median ms (triton.testing.do_bench,
each variant timed twice interleaved, the faster median kept), TFLOP/s, speed ratio to bf16 and
to `dequant` (what ComfyUI core does without FP4 tensor cores), relative error against the fp32
product of the dequantized weight, and the `emulate` (Blackwell W4A4) error for scale.
Hopper:    python benchmarks/bench_gemm.py --backends dequant,fp8,w4a16 --fast-accum
Blackwell: python benchmarks/bench_gemm.py --backends dequant,cudnn,cutlass,trtllm
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()
from bench_overhead import host_us  # noqa: E402  (host time per call)
from comfyui_nvfp4.kernels import registry  # noqa: E402
from comfyui_nvfp4.kernels.module import NVFP4LinearModule  # noqa: E402
from comfyui_nvfp4.kernels.portable import EMULATE  # noqa: E402
from comfyui_nvfp4.quant import nvfp4  # noqa: E402
from comfyui_nvfp4.quant.layers import NVFP4Linear  # noqa: E402

# (M, K, N): image+text tokens at 1024x1024 for the big ones; text-only, a few rows, and the M=1
# GEMMs of FLUX (modulation 3072->18432 / 9216, the time/guidance/vector MLPs 3072->3072); M = 16:
# the modulation GEMMs at batch 16.
SHAPES = [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
          (4608, 3072, 21504), (4608, 15360, 3072), (512, 3072, 12288), (16, 3072, 3072), (16, 3072, 18432),
          (16, 3072, 9216), (16, 12288, 3072), (8, 3072, 9216), (4, 3072, 18432), (4, 3072, 3072), (2, 3072, 9216),
          (1, 3072, 18432), (1, 3072, 9216), (1, 3072, 3072), (1, 12288, 3072)]
BIG = SHAPES[:6]


def bench(fn):
    """Median of do_bench after explicit warm-up calls (first calls compile Triton kernels)."""
    from triton.testing import do_bench
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


_FLUSH = {}
# How bench_graph empties L2 before each call. "write" (a 128 MB zero_) leaves L2 full of dirty
# lines, so the timed call's reads also pay for writing them back: as inside a model step, where
# the previous kernel's output is in L2, and costlier for the call that reads more bytes (bf16).
# "read" (a 128 MB sum) leaves clean lines: the timed call pays for its own reads only.
FLUSHES = ("write", "read")


def _flush_call(kind: str):
    buf = _FLUSH.setdefault("buf", torch.empty(32 << 20, dtype=torch.float32, device="cuda"))
    if kind == "write":
        return buf.zero_
    sink = _FLUSH.setdefault("sink", torch.empty((), dtype=torch.float32, device="cuda"))
    return lambda: torch.sum(buf, dim=None, out=sink)


def bench_graph(fn, reps: int = 20, flush: str = "write"):
    """GPU time of one call without the host's launch overhead: a CUDA graph of `reps` x (L2
    flush, call) minus one of `reps` x (L2 flush), median of 10 replays each. The flush (128 MB,
    see FLUSHES) keeps 4-bit weights that would fit the 50 MB L2 from being read from it."""
    if flush not in FLUSHES:
        raise ValueError(f"bench_graph: flush must be one of {FLUSHES}, got {flush!r}")
    empty_l2 = _flush_call(flush)

    def per_call(body):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compiles, autotunes, allocates
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                body()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return sorted(times)[len(times) // 2]

    return per_call(lambda: (empty_l2(), fn())) - per_call(empty_l2)


def bench_all(fns: dict, graph: bool = False, flush: str = "write") -> dict:
    """Each variant timed twice, interleaved; the faster median counts (removes order effects)."""
    best = {}
    for _ in range(2):
        for name, fn in fns.items():
            t = bench_graph(fn, flush=flush) if graph else bench(fn)
            best[name] = min(best.get(name, t), t)
    return best


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--backends", default="dequant,fp8,w4a16")
    ap.add_argument("--fast-accum", action="store_true", help="also time fp8 with cuBLAS's promoting accumulation")
    ap.add_argument("--graph", action="store_true",
                    help="time GPU work only (CUDA graphs, see bench_graph) and report each call's host time")
    ap.add_argument("--flush", choices=FLUSHES, default="write",
                    help="with --graph: empty L2 before each call by writing 128 MB (dirty lines, the "
                         "default) or by reading it (clean lines); see FLUSHES")
    ap.add_argument("--max-m", type=int, default=None, help="only the shapes with M <= this")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, table = [], []
    names = a.backends.split(",")
    for (m, k, n) in [s for s in SHAPES if a.max_m is None or s[0] <= a.max_m]:
        w = torch.randn(n, k, device=dev) / math.sqrt(k)
        mod = NVFP4LinearModule(k, n, bias=True)
        mod.set_layer(NVFP4Linear([nvfp4.quantize(w)], (torch.randn(n, device=dev) * 0.02).to(torch.bfloat16)))
        for name in names:
            b = registry.get(name)
            if b.prepares:
                mod.set_prepared(name, b.prepare(mod))
        mod.to(dev)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w_bf16 = mod.canonical().dequantize(torch.bfloat16)
        bias = mod.bias
        ref = x.float() @ mod.canonical().dequantize(torch.float32).t() + bias.float()
        flops = 2 * m * n * k
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w_bf16, bias)}
        if "dequant" not in names:
            fns["dequant"] = lambda: registry.get("dequant").run(mod, x)
        for name in names:
            b = registry.get(name)
            fns[name] = (lambda b=b: b.run(mod, x))
            if name == "fp8" and a.fast_accum:
                def promoting(b=b):
                    b.fast_accum = False
                    try:
                        return b.run(mod, x)
                    finally:
                        b.fast_accum = True
                fns["fp8-promoting-accum"] = promoting
        times = bench_all(fns, graph=a.graph, flush=a.flush)
        hosts = {label: host_us(fn) / 1e3 for label, fn in fns.items()} if a.graph else {}
        base = times["bf16"]
        res = {"shape": [m, k, n], "bf16_ms": base, "emulate_err": rel(EMULATE.run(mod, x.float()), ref),
               "bf16_err": rel(torch.nn.functional.linear(x, w_bf16, bias), ref)}
        table.append((f"{m},{k},{n}", "bf16", base, flops / base / 1e9, 1.0, times["dequant"] / base,
                      res["bf16_err"], hosts.get("bf16")))
        for label, fn in fns.items():
            if label == "bf16":
                continue
            ms, err = times[label], rel(fn(), ref)
            if mod.last_path and mod.last_path != label.split("-")[0] and label in names:
                label = f"{label} ({mod.last_path})"  # the path this M took, e.g. w4a16 (w4a16-dq)
            key = label.split(" ")[0]
            res[f"{key}_ms"], res[f"{key}_err"] = ms, err
            table.append((f"{m},{k},{n}", label, ms, flops / ms / 1e9, base / ms, times["dequant"] / ms, err,
                          hosts.get(key)))
        res["resident_bytes_ratio_w4a16"] = (mod.packed_0.numel() + mod.scale_0.numel()) / (2 * n * k)
        rows.append(res)
        del mod, w_bf16, x, ref
        torch.cuda.empty_cache()
    print(f"\ncard: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}")
    if a.graph:
        print(f"L2 emptied before each call by a 128 MB {a.flush}")
    timing = "GPU ms (CUDA graph) | host ms/call" if a.graph else "ms"
    print(f"| shape M,K,N | path | {timing} | TFLOP/s | x bf16 | x dequant | rel err |")
    print("|---|---|---|---|---|---|---|" + ("---|" if a.graph else ""))
    for s, p, ms, tf, ratio, rdq, err, host in table:
        host_col = f" {host:.3f} |" if a.graph else ""
        print(f"| {s} | {p} | {ms:.4f} |{host_col} {tf:.1f} | {ratio:.2f} | {rdq:.2f} | {err:.4f} |")
    for name in names + (["fp8-promoting-accum"] if a.fast_accum and "fp8" in names else []):
        big = [r["bf16_ms"] / r[f"{name}_ms"] for r in rows if tuple(r["shape"]) in BIG]
        if not big:
            continue
        print(f"{name}: geomean speed vs bf16 over the {len(big)} big FLUX.1-dev shapes: "
              f"{math.exp(sum(map(math.log, big)) / len(big)):.3f}x")
    for name in names:  # the small-M goal is per shape: the slowest one decides it
        small = sorted((r["bf16_ms"] / r[f"{name}_ms"], ",".join(map(str, r["shape"]))) for r in rows
                       if r["shape"][0] <= 16 and f"{name}_ms" in r)
        if small:
            print(f"{name}: speed vs bf16 at M <= 16, {len(small)} shapes: {small[0][0]:.2f}x ({small[0][1]}) "
                  f"to {small[-1][0]:.2f}x ({small[-1][1]})")
    print(f"emulate (W4A4) error range: {min(r['emulate_err'] for r in rows):.4f}-"
          f"{max(r['emulate_err'] for r in rows):.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
