"""Write canonical layers as a ComfyUI/BFL file or a ModelOpt (diffusers) export.

Nothing is written half-way: output goes to a temporary path next to the target and is
renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import e2m1, names
from .layers import NVFP4, FP8Linear, NVFP4Linear, swap_row_halves
from .merge import merge_parts, split_rows
from .swizzle import round_up, swizzle_128x4

COMFY, MODELOPT, DENSE = "comfy", "modelopt", "bf16"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class WriteReport:
    path: Path
    rescaled: dict[str, float] = field(default_factory=dict)  # layer -> relative error added
    layer_counts: dict[str, int] = field(default_factory=dict)


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(()).clone()


def _comfy_tensors(name: str, layer, report: WriteReport) -> tuple[dict, dict | None]:
    """Tensors in ComfyUI's layout, and the layer's metadata entry (None for dense)."""
    out = {}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.contiguous()
    if isinstance(layer, NVFP4Linear):
        w, err = merge_parts(layer.parts)
        if err:
            report.rescaled[name] = err
        n, k = w.shape
        packed = torch.zeros((round_up(n, 16), round_up(k, 16) // 2), dtype=torch.uint8)
        packed[:n, : k // 2] = e2m1.swap_nibbles(w.packed)
        out[f"{name}.weight"] = packed
        out[f"{name}.weight_scale"] = swizzle_128x4(w.block_scale)
        out[f"{name}.weight_scale_2"] = _scalar(w.global_scale)
        if w.input_scale is not None:
            out[f"{name}.input_scale"] = _scalar(w.input_scale)
        return out, {"format": "nvfp4"}
    if isinstance(layer, FP8Linear):
        out[f"{name}.weight"] = layer.weight.contiguous()
        out[f"{name}.weight_scale"] = _scalar(layer.weight_scale)
        if layer.input_scale is not None:
            out[f"{name}.input_scale"] = _scalar(layer.input_scale)
        return out, {"format": "float8_e4m3fn"}
    out[f"{name}.weight"] = layer.weight.contiguous()
    return out, None


def _diffusers_tensors(spec: names.LinearSpec, layer, hidden: int, report: WriteReport) -> dict:
    """Tensors under diffusers names (ModelOpt layout for NVFP4: low nibble first, linear scales)."""
    if spec.swap_halves:
        layer = swap_row_halves(layer)
    n = layer.shape[0]
    sizes = spec.source_sizes(n, hidden)
    out = {}
    biases = list(layer.bias.split(sizes)) if layer.bias is not None else [None] * len(sizes)
    if isinstance(layer, NVFP4Linear):
        pieces, err = split_rows(layer.parts, sizes)
        if err:
            report.rescaled[spec.name] = err
        for m, w, b in zip(spec.sources, pieces, biases):
            out[f"{m}.weight"] = w.packed.contiguous()
            out[f"{m}.weight_scale"] = w.block_scale.contiguous()
            out[f"{m}.weight_scale_2"] = _scalar(w.global_scale)
            if w.input_scale is not None:
                out[f"{m}.input_scale"] = _scalar(w.input_scale)
            if b is not None:
                out[f"{m}.bias"] = b.contiguous()
        return out
    if isinstance(layer, FP8Linear):
        raise ValueError(f"layer {spec.name} is FP8: a ModelOpt NVFP4 export cannot hold FP8 layers")
    for m, w, b in zip(spec.sources, layer.weight.split(sizes), biases):
        out[f"{m}.weight"] = w.contiguous()
        if b is not None:
            out[f"{m}.bias"] = b.contiguous()
    return out


def _diffusers_config(arch: str, layers_shapes: dict, depth: int, single: int) -> dict:
    hidden = layers_shapes["img_in"][0]
    cfg = {
        "_class_name": "FluxTransformer2DModel" if arch == names.FLUX1 else "Flux2Transformer2DModel",
        "patch_size": 1, "num_layers": depth, "num_single_layers": single,
        "attention_head_dim": 128, "num_attention_heads": hidden // 128,
        "joint_attention_dim": layers_shapes["txt_in"][1],
        "guidance_embeds": "guidance_in.in_layer" in layers_shapes,
    }
    if arch == names.FLUX1:
        cfg.update(in_channels=layers_shapes["img_in"][1], axes_dims_rope=[16, 56, 56])
        if "vector_in.in_layer" in layers_shapes:
            cfg["pooled_projection_dim"] = layers_shapes["vector_in.in_layer"][1]
    else:
        cfg.update(in_channels=layers_shapes["img_in"][1], mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
                   timestep_guidance_channels=256, rope_theta=2000)
    return cfg


def _atomic_replace(tmp: Path, out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use overwrite / --force to replace it)")
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_checkpoint(out, arch: str, layers, params: dict[str, torch.Tensor], *, flavour: str,
                     naming: str | None = None, overwrite: bool = False, extra_metadata=None) -> WriteReport:
    """Write (name, layer) pairs and BFL-keyed params.

    flavour "comfy": one .safetensors with BFL names and a _quantization_metadata header.
    flavour "modelopt": a diffusers folder (config.json with quantization_config + weights).
    flavour "bf16": unquantized; naming "bfl" (one file) or "diffusers" (a folder).
    """
    out = Path(out)
    if flavour not in (COMFY, MODELOPT, DENSE):
        raise ValueError(f"unknown output flavour {flavour!r}")
    naming = naming or (names.BFL if flavour == COMFY else names.DIFFUSERS)
    if flavour == COMFY and naming != names.BFL or flavour == MODELOPT and naming != names.DIFFUSERS:
        raise ValueError(f"flavour {flavour} is written with {'BFL' if flavour == COMFY else 'diffusers'} names")
    report = WriteReport(out)
    tensors: dict[str, torch.Tensor] = {}
    quant_layers: dict[str, dict] = {}
    shapes: dict[str, tuple[int, int]] = {}
    layers = list(layers)
    hidden = dict(layers)["img_in"].shape[0]
    keys = [n + "." for n, _ in layers] + list(params)
    depth = names.count_blocks(keys, "double_blocks.")
    single = names.count_blocks(keys, "single_blocks.")
    nm = names.build_name_map(arch, depth, single, any(n == "guidance_in.in_layer" for n, _ in layers),
                              any(n == "vector_in.in_layer" for n, _ in layers))
    for name, layer in layers:
        shapes[name] = layer.shape
        report.layer_counts[layer.format] = report.layer_counts.get(layer.format, 0) + 1
        if naming == names.BFL:
            t, conf = _comfy_tensors(name, layer, report)
            if conf is not None:
                quant_layers[name] = conf
        else:
            t = _diffusers_tensors(nm.linears[name], layer, hidden, report)
        tensors.update(t)
    for key, value in params.items():
        tensors[nm.params.get(key, key) if naming == names.DIFFUSERS else key] = value.contiguous()

    metadata = dict(extra_metadata or {})
    if quant_layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": quant_layers})
    out.parent.mkdir(parents=True, exist_ok=True)
    if naming == names.BFL:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata or None)
            _atomic_replace(Path(tmp), out, overwrite)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return report
    cfg = _diffusers_config(arch, shapes, depth, single)
    if flavour == MODELOPT:
        ignore = sorted(s for n, l in layers if l.format != NVFP4 for s in nm.linears[n].sources)
        cfg["quantization_config"] = {
            "quant_method": "modelopt", "quant_algo": "NVFP4", "producer": {"name": "comfyui-nvfp4"},
            "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
                                          "input_activations": {"num_bits": 4, "type": "float",
                                                                "group_size": 16}}},
            "ignore": ignore,
        }
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmpdir / DIFFUSERS_WEIGHTS), metadata=metadata or {"format": "pt"})
        (tmpdir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _atomic_replace(tmpdir, out, overwrite)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return report
