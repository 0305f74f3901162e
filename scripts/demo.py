"""The main job, end to end on whatever this machine has.

With a ComfyUI (--comfyui PATH or COMFYUI_PATH): start it headless with this plugin, generate a
small seeded NVFP4 FLUX.1 checkpoint (no downloads, no text encoder), queue a text-to-latent
workflow through /prompt, follow its progress on /ws and print where the result is.
Without one: say how to point at one, and run what works without it (`nvfp4` synth, inspect,
verify against the bf16 original).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, ensure_package  # noqa: E402

ensure_package()
from comfyui_nvfp4.quant import cli, names, quantize_checkpoint  # noqa: E402
from comfyui_nvfp4.quant.shapes import FluxDims  # noqa: E402
from comfyui_nvfp4.quant.synthetic import write_synthetic  # noqa: E402


def make_checkpoints(folder: Path, arch: str = names.FLUX1) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bf16 = folder / f"demo_{arch}_bf16.safetensors"
    nv = folder / f"demo_{arch}_nvfp4.safetensors"
    dims = FluxDims.tiny(arch, hidden=256, depth=2, depth_single=2)
    write_synthetic(bf16, dims, seed=0, overwrite=True)
    quantize_checkpoint(bf16, "comfy", nv, overwrite=True, progress=False)
    return bf16, nv


def without_comfyui(out: Path) -> int:
    print("No ComfyUI found. To run the full workflow, point at a ComfyUI checkout (v0.30.0+):\n"
          "  COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python bash scripts/demo.sh\n"
          "Running what works without it: the nvfp4 tool on a generated checkpoint.\n")
    bf16, nv = make_checkpoints(out / "checkpoints")
    print(f"$ nvfp4 inspect {nv}")
    cli.main(["inspect", str(nv)])
    print(f"\n$ nvfp4 verify {nv} --reference {bf16}")
    return cli.main(["verify", str(nv), "--reference", str(bf16), "-q"])


def with_comfyui(comfy: Path, out: Path) -> int:
    import torch

    from comfy_driver import ComfyServer
    from workflows import nvfp4_prompt

    os.environ["COMFYUI_PATH"] = str(comfy)
    base = out / "comfy_base"
    _, nv = make_checkpoints(base / "models" / "diffusion_models")
    args = [] if torch.cuda.is_available() else ["--cpu"]
    print(f"starting ComfyUI from {comfy} {' '.join(args)} (log: {base}/server-*.log)")
    server = ComfyServer(base, args, python=sys.executable)
    try:
        backends = server.get("/nvfp4/backends")
        print(f"device: {backends['device']}")
        for b in backends["backends"]:
            print(f"  {b['name']:8s} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
        prompt = nvfp4_prompt(nv.name, "auto", "flux1", steps=4, size=256, prefix="nvfp4_demo")
        print("queued: Load NVFP4 Diffusion Model -> NVFP4 GEMM Backend (auto) -> KSampler -> SaveLatent")
        result = server.run(prompt, on_message=_print_progress)
        if result["status"] != "success":
            print(f"FAILED: {result['errors'] or result.get('response')}")
            return 1
        latent = result["history"]["outputs"]["7"]["latents"][0]
        path = base / "output" / latent.get("subfolder", "") / latent["filename"]
        summary = server.progress_texts(result["messages"], "2")
        print(f"\nresult (latent, safetensors): {path}")
        if summary:
            print(summary[-1])
        return 0
    finally:
        server.stop()


def _print_progress(msg):
    if msg.get("type") == "progress":
        d = msg["data"]
        print(f"  node {d.get('node')}: {d['value']}/{d['max']}", flush=True)
    elif msg.get("type") == "executing" and msg["data"].get("node"):
        print(f"  executing node {msg['data']['node']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    ap.add_argument("--out", default=str(ROOT / "demo_output"), help="where generated files go")
    a = ap.parse_args()
    out = Path(a.out)
    if a.comfyui and (Path(a.comfyui) / "main.py").is_file():
        return with_comfyui(Path(a.comfyui), out)
    return without_comfyui(out)


if __name__ == "__main__":
    sys.exit(main())
