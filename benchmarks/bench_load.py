"""Load time and peak RSS of a FLUX.1-dev-sized NVFP4 checkpoint vs. a plain read of the file.

Generates a synthetic checkpoint (random codes and valid e4m3 scales, FLUX.1-dev shapes:
hidden 3072, 19 double + 38 single blocks) in a temp folder, then measures, each in a fresh
process: (1) reading the file's bytes into memory, (2) `Checkpoint(...)` + loading every layer
into canonical form. Usage: python benchmarks/bench_load.py [--flavour comfy|modelopt] [--dir D]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, flavour: str):
    import torch
    sys.path.insert(0, str(ROOT.parent))
    from comfyui_nvfp4.quant import names
    from comfyui_nvfp4.quant.layers import DenseLinear, NVFP4Linear
    from comfyui_nvfp4.quant.nvfp4 import NVFP4Weight
    from comfyui_nvfp4.quant.shapes import FluxDims, linear_shapes, param_shapes
    from comfyui_nvfp4.quant.writer import write_checkpoint

    dims = FluxDims(names.FLUX1, hidden=3072, depth=19, depth_single=38, img_in=64, context=4096, vector=768)
    g = torch.Generator().manual_seed(0)
    layers = []
    for name, (n, k) in linear_shapes(dims).items():
        bias = torch.zeros(n, dtype=torch.bfloat16)
        if names.is_excluded(name, None, names.DEFAULT_EXCLUDE):
            layers.append((name, DenseLinear(torch.zeros(n, k, dtype=torch.bfloat16), bias)))
            continue
        packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        scale = torch.randint(0x20, 0x60, (n, k // 16), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
        w = NVFP4Weight(packed, scale, torch.tensor(1e-3), torch.tensor(0.01))
        layers.append((name, NVFP4Linear([w], bias)))
    params = {k: torch.ones(s, dtype=torch.bfloat16) for k, s in param_shapes(dims).items()}
    write_checkpoint(path, names.FLUX1, layers, params, flavour=flavour, overwrite=True)


CHILD = r"""
import sys, time, json
mode, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "read":
    from pathlib import Path
    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors"))
    data = []
    for f in files:  # one preallocated buffer per file: exactly the file's bytes in memory
        b = bytearray(f.stat().st_size)
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(b)
        data.append(b)
    n = sum(len(d) for d in data)
else:
    sys.path.insert(0, sys.argv[3])
    from comfyui_nvfp4.quant import Checkpoint
    ck = Checkpoint(path)
    layers = {name: ck.load_linear(name) for name in ck.layers}
    params = {k: ck.load_param(k) for k in ck.params}
    n = ck.file_size()
dt = time.perf_counter() - t0
# VmHWM is this process image's own peak (ru_maxrss can carry the parent's across fork+exec).
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"mode": mode, "seconds": dt, "peak_rss": hwm, "file_bytes": n}))
"""


def measure(mode: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(ROOT.parent)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", choices=("comfy", "modelopt"), default="comfy")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--generate-only", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate_only:
        return generate(Path(a.generate_only), a.flavour)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = Path(d) / ("flux1dev.safetensors" if a.flavour == "comfy" else "flux1dev_modelopt")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-only", str(path), "--flavour", a.flavour], check=True)
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
        measure("read", path)  # warm the page cache so both runs see the same cache state
        base, ours = measure("read", path), measure("load", path)
        gib = base["file_bytes"] / 2**30
        print("| what | seconds | peak RSS GiB | RSS / file size |")
        print("|---|---|---|---|")
        for r, label in ((base, "plain read of the file bytes"), (ours, f"nvfp4 Checkpoint load, all layers ({a.flavour})")):
            print(f"| {label} | {r['seconds']:.2f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / base['file_bytes']:.2f} |")
        print(f"file size: {gib:.2f} GiB")


if __name__ == "__main__":
    main()
