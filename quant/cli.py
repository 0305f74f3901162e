"""`nvfp4`: inspect, verify, convert and quantize NVFP4 FLUX checkpoints."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from . import names
from .convert import convert_checkpoint, load_calibration, quantize_checkpoint
from .errors import CheckpointError
from .reader import Checkpoint
from .shapes import FluxDims
from .synthetic import write_synthetic
from .verify import DEFAULT_MAX_REL_ERR, verify_checkpoint

EPILOG = """\
A checkpoint (CKPT) is a .safetensors file, a diffusers folder (config.json + weights,
sharded with an index too) or a folder with hf_quant_config.json. Two NVFP4 flavours exist:
  modelopt  NVIDIA ModelOpt exports: diffusers names, low nibble first, linear scales
  comfy     ComfyUI / BFL files: BFL names, high nibble first, 128x4-swizzled scales
The flavour is read from the config or metadata; --flavour only helps a bare file that has none.

examples:
  nvfp4 synth tiny.safetensors --arch flux1 --format comfy
  nvfp4 inspect flux1-dev-nvfp4.safetensors
  nvfp4 verify flux1-dev-nvfp4.safetensors --reference flux1-dev.safetensors
  nvfp4 convert modelopt_export/ --to comfy -o flux1-dev-nvfp4.safetensors
  nvfp4 quantize flux1-dev.safetensors --format comfy -o flux1-dev-nvfp4.safetensors
"""


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(a) -> int:
    ck = Checkpoint(a.ckpt, a.flavour)
    s = ck.summary()
    if a.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['path']}\n  flavour: {s['flavour']}  ({s['layout']})\n  architecture: {s['architecture']}  "
          f"naming: {s['naming']}  hidden: {s['hidden_size']}\n  quant config: {s['quant_config']}\n"
          f"  size: {_human(s['file_bytes'])} in {len(s['files'])} file(s)\n  layers: " +
          ", ".join(f"{k}: {v}" for k, v in sorted(s['layer_counts'].items())))
    if s["missing_input_scale"]:
        print(f"  no input_scale (dynamic activation amax at run time): {len(s['missing_input_scale'])} layers")
    print(f"\n  {'layer':48s} {'format':6s} {'N x K':>13s}  bias  input_scale")
    for name, info in ck.layers.items():
        n, k = info.shape
        ins = "-" if info.format == "bf16" else ("yes" if info.has_input_scale else "no")
        print(f"  {name:48s} {info.format:6s} {n:>6d} x {k:<6d} {'yes' if info.has_bias else 'no':4s}  {ins}")
    return 0


def cmd_verify(a) -> int:
    r = verify_checkpoint(a.ckpt, a.reference, max_rel_err=a.max_rel_err, flavour=a.flavour,
                          progress=not a.quiet)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        errs = [v["rel_err"] for v in r["layers"].values() if "rel_err" in v]
        print(f"{r['path']}: {r['flavour']} {r['architecture']}, {len(r['layers'])} layers checked")
        if errs:
            print(f"  relative L2 error vs reference: max {max(errs):.4f}, mean {sum(errs) / len(errs):.4f} "
                  f"over {len(errs)} quantized layers (limit {r['max_rel_err']})")
        for p in r["problems"]:
            print(f"  PROBLEM {p}")
        print("  OK" if r["ok"] else f"  FAILED: {len(r['problems'])} problem(s)")
    return 0 if r["ok"] else 1


def _report(rep, a) -> None:
    print(f"wrote {rep.path}: " + ", ".join(f"{k}: {v}" for k, v in sorted(rep.layer_counts.items())))
    for name, err in rep.rescaled.items():
        print(f"  note: {name}: parts with different weight_scale_2 were rescaled to one global scale "
              f"(relative weight error added: {err:.2e})")
    for name in getattr(rep, "skipped", []):
        print(f"  note: {name} kept in bf16 (K not a multiple of 16)")


def cmd_convert(a) -> int:
    _report(convert_checkpoint(a.ckpt, a.to, a.output, flavour=a.flavour, overwrite=a.force,
                               progress=not a.quiet), a)
    return 0


def cmd_quantize(a) -> int:
    cal = load_calibration(a.calibration) if a.calibration else None
    _report(quantize_checkpoint(a.ckpt, a.format, a.output, exclude=a.exclude, calibration=cal,
                                default_exclude=not a.no_default_exclude, overwrite=a.force,
                                progress=not a.quiet), a)
    return 0


def cmd_synth(a) -> int:
    dims = FluxDims.tiny(a.arch, hidden=a.hidden, depth=a.depth, depth_single=a.single)
    out = Path(a.output)
    if a.format == "bf16":
        rep = write_synthetic(out, dims, naming=a.naming, seed=a.seed, overwrite=a.force)
    else:
        tmp = out.with_name(f".{out.name}.bf16-src")
        write_synthetic(tmp, dims, naming=names.BFL, seed=a.seed, overwrite=True)
        try:
            rep = quantize_checkpoint(tmp, a.format, out, overwrite=a.force, progress=not a.quiet)
        finally:
            tmp.unlink(missing_ok=True)
    _report(rep, a)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvfp4", description="Inspect, verify, convert and quantize NVFP4 "
                                "FLUX.1 / FLUX.2 checkpoints (ModelOpt exports and ComfyUI/BFL files).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name, help_, fn):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return s

    def ckpt_args(s):
        s.add_argument("ckpt", metavar="CKPT", help="checkpoint file or folder")
        s.add_argument("--flavour", choices=("modelopt", "comfy"),
                       help="layout of a bare file that carries no config or metadata")

    s = add("inspect", "show flavour, architecture and every layer's format, shape and scales", cmd_inspect)
    ckpt_args(s)
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")

    s = add("verify", "dequantize every layer, check scales and shapes; compare with a bf16 reference",
            cmd_verify)
    ckpt_args(s)
    s.add_argument("--reference", metavar="BF16_CKPT", help="original weights (BFL or diffusers names)")
    s.add_argument("--max-rel-err", type=float, default=DEFAULT_MAX_REL_ERR,
                   help=f"largest relative L2 weight error accepted (default {DEFAULT_MAX_REL_ERR})")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")

    s = add("convert", "convert between ModelOpt and ComfyUI layouts", cmd_convert)
    ckpt_args(s)
    s.add_argument("--to", required=True, choices=("comfy", "modelopt"),
                   help="comfy: one .safetensors for ComfyUI; modelopt: a diffusers folder")
    s.add_argument("-o", "--output", required=True, metavar="OUT")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")

    s = add("quantize", "quantize a bf16 FLUX checkpoint to NVFP4", cmd_quantize)
    s.add_argument("ckpt", metavar="BF16_CKPT")
    s.add_argument("--format", required=True, choices=("comfy", "modelopt"))
    s.add_argument("-o", "--output", required=True, metavar="OUT")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="glob on ComfyUI or diffusers layer names to keep in bf16 (repeatable)")
    s.add_argument("--no-default-exclude", action="store_true",
                   help="also quantize embedders, norm_out and the final projection")
    s.add_argument("--calibration", metavar="FILE",
                   help="safetensors of activation amax (or samples) per layer -> input_scale; "
                        "without it no input_scale is written and runtimes use the dynamic amax")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")

    s = add("synth", "write a small seeded synthetic FLUX checkpoint (for trying things out)", cmd_synth)
    s.add_argument("output", metavar="OUT")
    s.add_argument("--arch", choices=("flux1", "flux2"), default="flux1")
    s.add_argument("--format", choices=("comfy", "modelopt", "bf16"), default="comfy")
    s.add_argument("--naming", choices=("bfl", "diffusers"), default="bfl", help="for --format bf16")
    s.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 128")
    s.add_argument("--depth", type=int, default=1)
    s.add_argument("--single", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true")
    return p


def main(argv=None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `nvfp4 inspect X | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (CheckpointError, FileExistsError) as e:
        print(f"nvfp4 {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
