"""GPU time of the small-M linears (at most 16 rows: the modulation GEMMs at batch M) inside real
DiT steps, bf16 against w4a16: bench_gemm times each GEMM alone after emptying L2 one way or
another; here L2 holds whatever the step's previous kernels left. FLUX.1-dev dims in ComfyUI's own
Flux model (bench_step.build: random weights, 1024x1024, the embedders and final layer bf16 as
in the checkpoints), batch sizes from --batches. Each such linear call runs inside a
torch.profiler range named by its shape; its time is that range's span on the GPU timeline.
python benchmarks/bench_small_m_in_step.py --comfyui /path/to/ComfyUI [--batches 1,4,16]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import bench_step
from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.module import NVFP4LinearModule, active_backend

SMALL_M = 16
STEPS = 3  # profiled steps per path and batch
PREFIX = "small-M linear "


def mark_small_m_calls(model):
    """Hooks that put every call of a linear with at most SMALL_M rows in a profiler range."""
    def enter(module, args):
        module._small_m_range = None
        if not args:
            return
        x = args[0]
        rows = x.numel() // x.shape[-1]
        if rows <= SMALL_M:
            kind = getattr(module, "format_in_checkpoint", module.format)
            module._small_m_range = record_function(f"{PREFIX}{rows},{module.in_features},{module.out_features} {kind}")
            module._small_m_range.__enter__()

    def leave(module, args, out):
        if module._small_m_range is not None:
            module._small_m_range.__exit__(None, None, None)

    for m in model.modules():
        if isinstance(m, NVFP4LinearModule):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)


def small_m_times(model, inputs, backend) -> dict[str, list[float]]:
    """{"M,K,N kind": GPU microseconds of each call} over STEPS steps after two unprofiled ones."""
    with active_backend(backend), torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                model(**inputs)
            torch.cuda.synchronize()
    times = defaultdict(list)
    for e in prof.events():  # the GPU side of each range (the CPU side carries no device time)
        if e.name.startswith(PREFIX) and e.device_type.name == "CUDA":
            times[e.name[len(PREFIX):]].append(e.device_time_total)
    return times


def median(values):
    return sorted(values)[len(values) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--batches", default="1,4,16")
    a = ap.parse_args()
    sys.path.insert(0, a.comfyui)
    import comfy.ops

    dev = torch.device("cuda")
    quantized = bench_step.build(comfy.ops, True, dev, bench_step.DIMS["flux1"])
    dense = bench_step.dense_copy(quantized)
    w4a16 = registry.get("w4a16")
    for m in quantized.modules():
        if isinstance(m, NVFP4LinearModule) and m.format == "nvfp4":
            m.set_prepared("w4a16", w4a16.prepare(m))
    mark_small_m_calls(quantized)
    # the dense copy's layers are all bf16: its ranges take the quantized twin's kind
    for dm, qm in zip(dense.modules(), quantized.modules()):
        if isinstance(qm, NVFP4LinearModule):
            dm.format_in_checkpoint = qm.format
    mark_small_m_calls(dense)
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}; FLUX.1-dev dims, 1024x1024; GPU us a call, median over {STEPS} steps")
    one = bench_step.step_inputs(dev, bench_step.DIMS["flux1"])
    for batch in map(int, a.batches.split(",")):
        inputs = {k: v.expand(batch, *v.shape[1:]).contiguous() if v.dim() else v for k, v in one.items()}
        bf16, ours = small_m_times(dense, inputs, None), small_m_times(quantized, inputs, "w4a16")
        print(f"\nbatch {batch}:")
        print("| shape M,K,N | NVFP4 in the checkpoint | calls a step | bf16 us | w4a16 us | x bf16 |")
        print("|---|---|---|---|---|---|")
        total_bf16 = total_ours = 0.0
        for shape in sorted(bf16, key=lambda s: -sum(bf16[s])):
            quant = shape.endswith(" nvfp4")
            if quant:
                total_bf16 += sum(bf16[shape])
                total_ours += sum(ours[shape])
            b, o = median(bf16[shape]), median(ours[shape])
            where = "yes" if quant else "no (bf16 on both paths)"
            print(f"| {shape.split()[0]} | {where} | {len(bf16[shape]) // STEPS} | {b:.1f} | {o:.1f} | {b / o:.2f}x |")
        print(f"NVFP4 small-M linears of one step: bf16 {total_bf16 / STEPS:.0f} us, w4a16 {total_ours / STEPS:.0f} us "
              f"({total_bf16 / total_ours:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
