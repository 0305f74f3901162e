"""What `auto` picks on this GPU for a FLUX model's NVFP4 layers, timed as the node times them.

Runs kernels/autotune.choose (fresh cache in a temporary folder) over every distinct (N, K, kind)
of FLUX.1-dev's (or FLUX.2-dev's) quantized linears: token layers timed at 512 + 4096 rows,
layers fed the conditioning vector (modulation) at 1 + 16 rows, each call charged the larger of
its GPU time (L2 emptied before it) and its host time. Prints the table (per-backend ms, winner, how many layers) and the resident
weight bytes of the picks against every layer on one backend. One call on the device:
    python benchmarks/bench_auto.py [--arch flux1|flux2] [--backends fp8,w4a16,dequant]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()
from comfyui_nvfp4.kernels import autotune, registry  # noqa: E402
from comfyui_nvfp4.quant import names  # noqa: E402
from comfyui_nvfp4.quant.shapes import FluxDims, linear_shapes  # noqa: E402

DEV_DIMS = {  # the published models' sizes
    names.FLUX1: FluxDims(names.FLUX1, hidden=3072, depth=19, depth_single=38, context=4096, vector=768),
    names.FLUX2: FluxDims(names.FLUX2, hidden=6144, depth=8, depth_single=48, img_in=128, context=15360,
                          vector=None, out=128),
}


def resident_bytes(backend: str, n: int, k: int) -> int:
    """Weight bytes a layer keeps on the GPU on `backend` (fp8: e4m3 + an fp32 scale per row;
    w4a16 and dequant: the 4-bit codes + one byte per 16-weight block)."""
    return n * k + 4 * n if backend == "fp8" else n * k // 2 + n * k // 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=[names.FLUX1, names.FLUX2], default=names.FLUX1)
    ap.add_argument("--backends", default="fp8,w4a16,dequant")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cands = [registry.get(b) for b in a.backends.split(",")]
    layers = {name: shape for name, shape in linear_shapes(DEV_DIMS[a.arch]).items()
              if not names.is_excluded(name, None, names.DEFAULT_EXCLUDE)}  # what NVFP4 files quantize
    keys = {name: (n, k, autotune.kind_of(name)) for name, (n, k) in layers.items()}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NVFP4_CACHE_DIR"] = cache
        table = autotune.choose(set(keys.values()), dev, cands)
    count = Counter(keys.values())
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}; {a.arch}-dev NVFP4 layers: {len(layers)}")
    print("| N x K | kind (rows timed) | layers | " + " | ".join(f"{b.name} ms" for b in cands) + " | auto picks |")
    print("|---|---|---|" + "---|" * len(cands) + "---|")
    for key in sorted(table, key=lambda t: (t[2], t[0], t[1])):
        n, k, kd = key
        r = table[key]
        rows = "+".join(str(m) for m in autotune.TOKEN_COUNTS[kd])
        print(f"| {n} x {k} | {kd} ({rows}) | {count[key]} | "
              + " | ".join(f"{r['ms'][b.name]:.4f}" for b in cands) + f" | {r['winner']} |")
    picked = sum(resident_bytes(table[keys[nm]]["winner"], *layers[nm]) for nm in layers)
    print(f"resident weight bytes of auto's picks: {picked / 2**30:.2f} GiB; every layer on one backend: "
          + ", ".join(f"{b.name} {sum(resident_bytes(b.name, n, k) for n, k in layers.values()) / 2**30:.2f} GiB"
                      for b in cands))
    per = Counter(table[keys[nm]]["winner"] for nm in layers)
    print("layers per pick: " + ", ".join(f"{b}: {c}" for b, c in per.most_common()))


if __name__ == "__main__":
    main()
