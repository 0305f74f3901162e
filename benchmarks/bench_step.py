"""One FLUX.1-dev-sized (or, with --arch flux2, FLUX.2-dev-sized) DiT step in ComfyUI's own Flux
model (random weights, 1024x1024, batch 1).

`--size 256 --text-tokens 64` makes the step host-bound (320 tokens of GPU work): its time is
then what the host spends on a step, for ComfyUI's own code (the bf16 row) and for ours.

Compares the same weights as: plain bf16 Linear (ComfyUI's ops), and our NVFP4 module with the
`dequant` (what ComfyUI core does on non-Blackwell GPUs), `fp8` and `w4a16` backends. Reports
median step time, resident linear-weight bytes, peak VRAM during the step, and the time to
prepare every layer for fp8 (the CPU -> GPU -> CPU path the node uses).
Needs ComfyUI importable: --comfyui PATH (a checkout, or the trimmed copy the device run carries).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()
from comfyui_nvfp4.kernels import autotune, preparation, registry  # noqa: E402
from comfyui_nvfp4.kernels.module import NVFP4LinearModule, active_backend  # noqa: E402
from comfyui_nvfp4.quant import names  # noqa: E402
from comfyui_nvfp4.quant.layers import DenseLinear, NVFP4Linear  # noqa: E402
from comfyui_nvfp4.quant.nvfp4 import NVFP4Weight  # noqa: E402

DIMS = {  # ComfyUI's Flux configurations (comfy/model_detection.py) at the released models' sizes
    "flux1": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                  hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                  axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                  txt_ids_dims=[]),
    "flux2": dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360,
                  hidden_size=6144, mlp_ratio=3.0, num_heads=48, depth=8, depth_single_blocks=48,
                  axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
                  txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0),
}
MODEL_NAMES = {"flux1": "FLUX.1-dev", "flux2": "FLUX.2-dev"}


def random_nvfp4(n, k, dev, g):
    packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
    # e4m3 block scales around 1.0 and weight_scale_2 so that |w| ~ 1/sqrt(k)
    scale = (torch.rand(n, k // 16, device=dev, generator=g) * 1.5 + 0.5).to(torch.float8_e4m3fn)
    # random codes have mean |e2m1| ~2.4 and scales ~1.25: weight_scale_2 makes |w| ~ 0.3/sqrt(k)
    return NVFP4Weight(packed, scale, torch.tensor(0.02 / math.sqrt(k), device=dev))


def build(comfy_ops, quantized: bool, dev, dims):
    import comfy.ldm.flux.model as fm

    g = torch.Generator(device=dev).manual_seed(0)

    class Linear(NVFP4LinearModule):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__(in_features, out_features, bias)
            b = (torch.randn(out_features, device=dev, generator=g) * 0.01).to(torch.bfloat16) if bias else None
            if quantized:
                self.set_layer(NVFP4Linear([random_nvfp4(out_features, in_features, dev, g)], b))
            else:
                self.set_layer(DenseLinear((torch.randn(out_features, in_features, device=dev, generator=g)
                                            * 0.05 / math.sqrt(in_features)).to(torch.bfloat16), b))

    class Ops(comfy_ops.manual_cast):
        pass

    Ops.Linear = Linear
    model = fm.Flux(dtype=torch.bfloat16, device=dev, operations=Ops, **dims)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.RMSNorm):  # ComfyUI leaves these uninitialized (checkpoints fill them)
            m.weight.data = (torch.rand(m.weight.shape, device=dev, generator=g) * 0.5 + 0.75).to(m.weight.dtype)
        if isinstance(m, Linear):
            m.layer_name = n
            if names.is_excluded(n, None, names.DEFAULT_EXCLUDE) and m.format == "nvfp4":
                m.set_layer(DenseLinear(m.canonical().dequantize(torch.bfloat16), m._parameters.get("bias")))
    return model.to(dev).eval()


def dense_copy(qmodel):
    """The same model with every NVFP4 linear replaced by its dequantized bf16 weights."""
    import copy
    d = copy.deepcopy(qmodel)
    for m in d.modules():
        if isinstance(m, NVFP4LinearModule) and m.format == "nvfp4":
            m.set_layer(DenseLinear(m.canonical().dequantize(torch.bfloat16), m._parameters.get("bias")))
    return d


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.rsplit(".", 1)[-1].startswith(("packed", "scale", "weight", "prep_")))


def step_inputs(dev, dims, size=1024, text_tokens=512):
    """FLUX.1: 16-channel latents at 1/8 of the image, 2x2 patches; FLUX.2: 128 channels at 1/16,
    patch 1. Either way (size / 16)^2 image tokens."""
    g = torch.Generator(device=dev).manual_seed(1)
    latent = size // 8 if dims["patch_size"] == 2 else size // 16
    y = dims["vec_in_dim"]
    return dict(x=torch.randn(1, dims["in_channels"], latent, latent, device=dev, generator=g, dtype=torch.bfloat16),
                timestep=torch.tensor([0.5], device=dev, dtype=torch.float32),
                context=torch.randn(1, text_tokens, dims["context_in_dim"], device=dev, generator=g,
                                    dtype=torch.bfloat16),
                y=torch.randn(1, y, device=dev, generator=g, dtype=torch.bfloat16) if y else None,
                guidance=torch.tensor([3.5], device=dev, dtype=torch.float32))


FUSED = "fp8+fused"  # the fp8 backend with the fused FLUX blocks (nodes/block_patches.py)
# the layers fed the conditioning vector (modulation) on w4a16, the token layers on fp8 with fused
# blocks: what `auto` runs where w4a16's small-M call is the cheaper one (nodes/backend_apply.select)
MIX = "fp8+fused+w4a16-vector"


def path_args(path, inputs, patches):
    """(backend, model inputs) of a path: fp8+fused runs fp8 with the dit block replacements."""
    if path == FUSED:
        return "fp8", {**inputs, "transformer_options": {"patches_replace": {"dit": patches}}}
    if path == MIX:  # per layer: NVFP4LinearModule.auto_choice, set in main
        return registry.AUTO, {**inputs, "transformer_options": {"patches_replace": {"dit": patches}}}
    return path, inputs


def time_step(model, inputs, backend=None, reps=5):
    with active_backend(backend), torch.inference_mode():
        out = model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = model(**inputs)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        peak_extra = torch.cuda.max_memory_allocated() - base
    return sorted(times)[len(times) // 2], peak_extra, out


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(t in n for t in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(t in n for t in ("_act_quant", "_small_m", "_decode_kernel", "_ln_mod_quant", "_gelu_quant", "_swiglu_quant",
                            "_qk_norm_rope")):
        return "our triton"
    if any(t in n for t in ("gemm", "sm90_xmma", "cutlass", "nvjet", "f8f8bf16", "gemv", "cublas")):
        return "gemm"
    return "other"


def kernel_breakdown(model, inputs, backend) -> str:
    """Sum of CUDA kernel durations by kind for one step (torch.profiler), next to the step's
    wall time: their difference is time the GPU waited for the host."""
    from torch.profiler import ProfilerActivity, profile
    with active_backend(None if backend == "bf16" else backend), torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
    kinds: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            k = kernel_kind(e.name)
            kinds[k] = kinds.get(k, 0.0) + e.device_time / 1e3
    total = sum(kinds.values())
    return (", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items())) +
            f"; all kernels {total:.1f}; wall (profiled) {wall:.1f}")


def graph_step_ms(model, inputs, backend, reps=5):
    """Step time with the whole forward captured in one CUDA graph (no host overhead): the GPU-
    bound floor of the same kernels. Returns None (and says why) where capture fails."""
    try:
        with active_backend(None if backend == "bf16" else backend), torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    model(**inputs)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model(**inputs)
            times = []
            for _ in range(reps):
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                st.record()
                g.replay()
                en.record()
                torch.cuda.synchronize()
                times.append(st.elapsed_time(en))
            del g
            return sorted(times)[len(times) // 2]
    except Exception as e:  # noqa: BLE001 - report and carry on
        print(f"{backend}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--profile", action="store_true", help="GPU kernel time by kind (attention/GEMM/...) per path")
    ap.add_argument("--graph", action="store_true", help="also time each path captured in one CUDA graph")
    ap.add_argument("--prep-only", action="store_true", help="only time the preparations (fp8 and --backends)")
    ap.add_argument("--compile-at-load", action="store_true",
                    help="start compiling the kernels when the model is built, as the loader node does when it "
                         "reads a checkpoint (preparation.start_compiling), instead of at preparation")
    ap.add_argument("--size", type=int, default=1024,
                    help="image side in pixels (a multiple of 16). Small sizes with few --text-tokens leave the "
                         "GPU waiting for the host: the step time is then the host's time for a step")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--arch", choices=sorted(DIMS), default="flux1", help="the model's dims: FLUX.1-dev or FLUX.2-dev")
    ap.add_argument("--blocks", default=None, metavar="DOUBLE,SINGLE",
                    help="fewer blocks than the model has (default: all); the table then says so")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per path (the median is reported)")
    ap.add_argument("--backends", default=f"dequant,w4a16,fp8,{FUSED}",
                    help=f"Hopper: dequant,w4a16,fp8,{FUSED} (and '{MIX}', which needs w4a16 in the list); "
                         f"Blackwell: dequant,cudnn,cutlass,trtllm")
    a = ap.parse_args()
    sys.path.insert(0, a.comfyui)
    import comfy.ops

    dev = torch.device("cuda")
    dims = dict(DIMS[a.arch])
    if a.blocks:
        dims["depth"], dims["depth_single_blocks"] = (int(n) for n in a.blocks.split(","))
    q = build(comfy.ops, True, dev, dims)
    modules = [m for m in q.modules() if isinstance(m, NVFP4LinearModule) and m.format == "nvfp4"]
    if a.compile_at_load:
        t_load = time.perf_counter()
        started = preparation.start_compiling(modules, dev)
    nparams = sum(m.in_features * m.out_features for m in modules)
    # Preparation as the node does it (preparation.prepare_modules): from the CPU originals of an
    # offloaded model, converted on the GPU, self-checked there, stored back on the CPU.
    q.cpu()
    # other backends' layouts, prepared as the node does (timed, self-checked) and kept aside:
    # preparing one backend drops the others'
    kept = {m: {} for m in modules}
    for extra in a.backends.split(","):
        b = registry.get(extra) if extra not in (FUSED, MIX) else None
        if b is not None and b.prepares and extra != "fp8":
            # twice: the first run compiles the backend's Triton kernels (a machine's first run
            # only: Triton caches them on disk), the second is what every later load takes
            for when in ("first run, compiling kernels", "again, kernels compiled"):
                for m in modules:
                    m.drop_prepared()
                if a.compile_at_load and when.startswith("first"):
                    print(f"kernels started compiling at the model's build (--compile-at-load): preparation "
                          f"starts {time.perf_counter() - t_load:.2f} s later, {sum(x.launches for x in started)} "
                          f"launches queued then", flush=True)
                info = preparation.prepare_modules(modules, b, dev, self_check=True, workers=preparation.PREP_WORKERS)
                print(f"{extra} preparation, {preparation.PREP_WORKERS} thread(s), self-check True: "
                      f"{info['seconds']:.2f} s ({when}; compiling {info['compile_launches']} kernel "
                      f"launches alongside: {info['compile_seconds']:.2f} s)", flush=True)
            for m in modules:
                kept[m][extra] = {n[len(f"prep_{extra}_"):]: p.data for n, p in m.named_parameters()
                                  if n.startswith(f"prep_{extra}_")}
    fp8 = registry.get("fp8")
    prep = {}
    # the node's way first (4 threads, self-check): a machine's first preparation if Triton's cache
    # is empty (it compiles the kernels), then the three ways with the kernels compiled
    pw = preparation.PREP_WORKERS
    for workers, check, when in ((pw, True, "first"), (1, False, ""), (pw, False, ""), (pw, True, "")):
        for m in modules:
            m.drop_prepared()
        torch.cuda.synchronize()
        info = preparation.prepare_modules(modules, fp8, dev, self_check=check, workers=workers)
        if not when:
            prep[workers, check] = info["seconds"]
        print(f"fp8 preparation, {workers} thread(s), self-check {check}: {info['seconds']:.2f} s"
              + (f" (first run; compiling {info['compile_launches']} kernel launches "
                 f"alongside: {info['compile_seconds']:.2f} s)" if when else ""), flush=True)
    assert all(m.prep_fp8_w.device.type == "cpu" for m in modules)
    if a.prep_only:
        return
    for m in modules:
        for extra, tensors in kept[m].items():
            m.set_prepared(extra, tensors)
    for m in modules:
        # the node parks the canonical tensors a prepared layout replaces (they stay on the CPU);
        # this benchmark runs every path on one model, so they go back to the parameters and
        # follow the model to the GPU (else bf16/dequant would read them over PCIe per call)
        m.unpark()
    q.to(dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for m in modules:  # the conversion alone, weights already on the GPU
        fp8.prepare(m)
    torch.cuda.synchronize()
    prep_gpu_s = time.perf_counter() - t0
    d = dense_copy(q)
    for m in d.modules():
        if isinstance(m, NVFP4LinearModule):
            m.drop_prepared()
    inputs = step_inputs(dev, dims, a.size, a.text_tokens)
    from comfyui_nvfp4.nodes.block_patches import block_patches
    patches, _ = block_patches(q)
    for m in modules:  # the MIX path's per-layer choice
        m.auto_choice = "w4a16" if autotune.kind_of(m.layer_name) == autotune.VECTOR else "fp8"
    rows = []
    t_bf16, peak_bf16, ref = time_step(d, inputs, reps=a.reps)
    rows.append(("bf16 (dequantized weights)", t_bf16, weight_bytes(d), peak_bf16, 0.0))
    del d
    torch.cuda.empty_cache()
    # linear-weight bytes each path reads: the non-NVFP4 weights, plus the NVFP4 layers' codes and
    # e4m3 scales (dequant), the w4a16 words (the codes in another order) and the scales (w4a16),
    # or the FP8 weights and row scales (fp8)
    nvfp4_params = sum(p.numel() * p.element_size() for m in modules for n, p in m.named_parameters()
                       if n.startswith(("packed", "scale", "prep_")))
    dense = weight_bytes(q) - nvfp4_params

    def layer_bytes(backend, mods):
        """Resident NVFP4-layer bytes of `mods` on `backend` (see above)."""
        if backend == "dequant":
            return sum(m.in_features * m.out_features // 2 + m.in_features * m.out_features // 16 for m in mods)
        prepped = sum(p.numel() * p.element_size() for m in mods for n, p in m.named_parameters()
                      if n.startswith(f"prep_{backend}_"))
        return prepped + (sum(m.in_features * m.out_features // 16 for m in mods) if backend == "w4a16" else 0)
    for path in a.backends.split(","):
        backend, args = path_args(path, inputs, patches)
        for m in modules:
            m.last_path = None
        t, peak, out = time_step(q, args, backend, reps=a.reps)
        from collections import Counter
        print(path, "paths:", dict(Counter(m.last_path for m in q.modules() if isinstance(m, NVFP4LinearModule))))
        if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
            print(f"non-finite output: reference {bool(torch.isfinite(ref).all())}, {path} "
                  f"{bool(torch.isfinite(out).all())}; max |ref| {ref.float().abs().nan_to_num().max():.3g}")
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        if path == MIX:
            wb = dense + sum(layer_bytes(b, [m for m in modules if m.auto_choice == b]) for b in ("fp8", "w4a16"))
        else:
            wb = dense + layer_bytes(backend, modules)
        rows.append((path, t, wb, peak, err))
    if a.graph:
        d = dense_copy(q)
        graphs = {"bf16": graph_step_ms(d, inputs, "bf16")}
        del d
        torch.cuda.empty_cache()
        for path in a.backends.split(","):
            if path != "dequant":
                backend, args = path_args(path, inputs, patches)
                graphs[path] = graph_step_ms(q, args, backend)
        print("whole step in one CUDA graph (ms): " + ", ".join(
            f"{k} {v:.1f}" if v else f"{k} n/a" for k, v in graphs.items()))
    if a.profile:
        for path in ["bf16"] + [b for b in a.backends.split(",") if b in ("fp8", "w4a16", FUSED)]:
            model = dense_copy(q) if path == "bf16" else q
            backend, args = path_args(path, inputs, patches)
            print(f"{path}: GPU kernel time by kind in one step (ms): " + kernel_breakdown(model, args, backend))
            del model
            torch.cuda.empty_cache()
    print(f"\ncard: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}; {MODEL_NAMES[a.arch]} dims ({dims['depth']} double + "
          f"{dims['depth_single_blocks']} single blocks{', fewer than the model has' if a.blocks else ''}), "
          f"{a.size}x{a.size} ({(a.size // 16) ** 2} image + {a.text_tokens} text tokens)")
    w = preparation.PREP_WORKERS
    print(f"NVFP4 linears: {len(modules)} layers, {nparams / 1e9:.2f} B weights; fp8 preparation of all of "
          f"them as the node does it (CPU originals -> GPU -> CPU): {prep[1, False]:.2f} s in one thread, "
          f"{prep[w, False]:.2f} s in {w}, {prep[w, True]:.2f} s in {w} with the self-check; the conversion alone "
          f"on GPU-resident weights: {prep_gpu_s:.2f} s")
    print("| path | step ms | x bf16 | x dequant | linear weight GiB | peak extra VRAM in step GiB | rel err vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    t_deq = rows[1][1]
    for name, t, wb, peak, err in rows:
        print(f"| {name} | {t:.1f} | {t_bf16 / t:.2f} | {t_deq / t:.2f} | {wb / 2**30:.2f} | {peak / 2**30:.2f} | {err:.2e} |")


if __name__ == "__main__":
    main()
