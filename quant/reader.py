"""Open an NVFP4 (or bf16) FLUX checkpoint and present every layer in canonical form.

Which layout the NVFP4 tensors use is decided from the config or metadata (ModelOpt:
config.json `quantization_config` or `hf_quant_config.json`; ComfyUI/BFL: the
`_quantization_metadata` header or `.comfy_quant` tensors), never from shapes.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import e2m1, names
from .errors import (BadScaleError, CheckpointError, DTypeMismatchError, MissingTensorError,
                     NotFluxError, ShapeMismatchError, UnknownFlavourError, UnsupportedShapeError)
from .layers import BF16, FP8, NVFP4, DenseLinear, FP8Linear, NVFP4Linear, swap_row_halves
from .nvfp4 import BLOCK, NVFP4Weight, concat_rows
from .store import TensorStore
from .swizzle import padded_scale_shape, round_up, unswizzle_128x4

MODELOPT, COMFY, DENSE = "modelopt", "comfy", "bf16"
FLAVOURS = (MODELOPT, COMFY)
_IGNORED_SUFFIXES = ("_quantizer._amax", "quantizer._amax")
_COMFY_FORMATS = {"nvfp4": NVFP4, "float8_e4m3fn": FP8}
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class QuantConfig:
    flavour: str
    source: str                      # where the config came from, for messages
    exclude: tuple[str, ...] = ()    # ModelOpt: module patterns left unquantized
    comfy_layers: dict = field(default_factory=dict)  # ComfyUI: layer -> {"format": ...}


@dataclass
class LayerInfo:
    """What a layer is, read from headers only (no tensor data)."""
    name: str
    format: str
    shape: tuple[int, int]
    sources: tuple[str, ...]
    has_bias: bool
    has_input_scale: bool
    stored: dict[str, tuple] = field(default_factory=dict)  # key -> stored shape

    def to_json(self) -> dict:
        d = {"format": self.format, "shape": list(self.shape), "bias": self.has_bias}
        if self.format != BF16:
            d["input_scale"] = self.has_input_scale
        if len(self.sources) > 1 or self.sources[0] != self.name:
            d["sources"] = list(self.sources)
        d["stored"] = {k: list(v) for k, v in self.stored.items()}
        return d


def _find_files(path: Path) -> tuple[list[Path], Path | None]:
    """Weight files and the folder whose config applies."""
    if path.is_file():
        return [path], path.parent
    if not path.is_dir():
        raise CheckpointError("checkpoint not found", path=path)
    if (path / "transformer").is_dir() and not list(path.glob("*.safetensors")):
        path = path / "transformer"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError("unreadable shard index", path=indexes[0], expected='{"weight_map": {...}}',
                                  found=repr(e)) from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError("shard listed in the index is missing", path=missing[0])
        return files, path
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError("folder holds no .safetensors file", path=path)
    return files, path


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError("invalid JSON", path=p, found=str(e)) from None


def _modelopt_from_config(cfg: dict, where: str) -> QuantConfig | None:
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "modelopt":
        algo = str(q.get("quant_algo", "")).upper()
        groups = q.get("config_groups") or {}
        sizes = {g.get("weights", {}).get("group_size") for g in groups.values() if isinstance(g, dict)}
        sizes.discard(None)
        if algo != "NVFP4" or sizes - {BLOCK}:
            raise CheckpointError("unsupported ModelOpt quantization", path=where,
                                  expected="quant_algo NVFP4 with group_size 16",
                                  found=f"quant_algo {algo or '?'}, group sizes {sorted(sizes) or '?'}")
        return QuantConfig(MODELOPT, where, tuple(q.get("ignore") or ()))
    return None


def _modelopt_from_hf_quant(cfg: dict, where: str) -> QuantConfig | None:
    q = cfg.get("quantization")
    if not isinstance(q, dict):
        return None
    algo = str(q.get("quant_algo", "")).upper()
    if algo != "NVFP4" or q.get("group_size", BLOCK) != BLOCK:
        raise CheckpointError("unsupported ModelOpt quantization", path=where,
                              expected="quant_algo NVFP4 with group_size 16",
                              found=f"quant_algo {algo or '?'}, group_size {q.get('group_size')}")
    return QuantConfig(MODELOPT, where, tuple(q.get("exclude_modules") or ()))


def detect_quant_config(store: TensorStore, folder: Path | None, strip: str) -> QuantConfig | None:
    md = store.metadata
    if "_quantization_metadata" in md:
        try:
            layers = json.loads(md["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError("invalid _quantization_metadata header", path=store.files[0],
                                  found=str(e)) from None
        layers = {k[len(strip):] if strip and k.startswith(strip) else k: v for k, v in layers.items()}
        return QuantConfig(COMFY, f"{store.files[0]} header _quantization_metadata", comfy_layers=layers)
    cq = [k for k in store.keys() if k.endswith(".comfy_quant")]
    if cq:
        return QuantConfig(COMFY, f"{store.files[0]} .comfy_quant tensors",
                           comfy_layers={k[:-len(".comfy_quant")]: store.get_json(k) for k in cq})
    for key in ("quantization_config", "hf_quant_config"):
        if key in md:
            try:
                cfg = json.loads(md[key])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"invalid {key} header", path=store.files[0], found=str(e)) from None
            qc = (_modelopt_from_config({"quantization_config": cfg}, f"{store.files[0]} header")
                  or _modelopt_from_hf_quant(cfg, f"{store.files[0]} header"))
            if qc:
                return qc
    if folder is not None:
        if (folder / "config.json").is_file():
            qc = _modelopt_from_config(_read_json(folder / "config.json"), str(folder / "config.json"))
            if qc:
                return qc
        if (folder / "hf_quant_config.json").is_file():
            qc = _modelopt_from_hf_quant(_read_json(folder / "hf_quant_config.json"),
                                         str(folder / "hf_quant_config.json"))
            if qc:
                return qc
    return None


class Checkpoint:
    """An opened checkpoint. Layer data is read one layer at a time, on request."""

    def __init__(self, path, flavour: str | None = None):
        self.path = Path(path)
        files, folder = _find_files(self.path)
        store = TensorStore(files)
        strip = names.strip_prefix(store.keys())
        self.store = store.restrip(strip)
        keys = {k for k in self.store.keys() if not k.endswith(_IGNORED_SUFFIXES)}
        self.naming = names.detect_naming(keys)
        self.architecture = names.detect_architecture(keys, self.naming) if self.naming else None
        if self.architecture is None:
            raise NotFluxError("not a FLUX.1 or FLUX.2 diffusion transformer", path=self.path,
                               expected="keys such as double_blocks.0.img_attn.qkv.weight / img_in.weight "
                                        "(BFL) or transformer_blocks.0.attn.to_q.weight (diffusers)",
                               found=f"{len(keys)} keys, e.g. {sorted(keys)[:3]}")
        self.names = names.name_map_for_keys(keys, self.naming, self.architecture)
        self.quant = detect_quant_config(self.store, folder, strip)
        has_packed = any(self.store.dtype(k) == torch.uint8 and k.endswith(".weight") for k in keys)
        if flavour is not None:
            if flavour not in FLAVOURS:
                raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
            if self.quant is not None and self.quant.flavour != flavour:
                raise UnknownFlavourError("flavour override contradicts the checkpoint's own config",
                                          path=self.path, expected=flavour,
                                          found=f"{self.quant.flavour} ({self.quant.source})")
            if self.quant is None:
                self.quant = QuantConfig(flavour, "user override")
        if self.quant is None and has_packed:
            raise UnknownFlavourError(
                "checkpoint has packed uint8 weights but no quantization config or metadata",
                path=self.path,
                expected="config.json quantization_config / hf_quant_config.json (ModelOpt) or a "
                         "_quantization_metadata header (ComfyUI); or pass --flavour")
        self.flavour = self.quant.flavour if self.quant else DENSE
        self._keys = keys
        self._check_keys()
        self.layers: dict[str, LayerInfo] = {n: self._layer_info(n) for n in self.names.linears}
        self.layers = {n: i for n, i in self.layers.items() if i is not None}
        self.params = self._param_keys()
        self.hidden_size = self.layers["img_in"].shape[0] if "img_in" in self.layers else None

    # ----- key bookkeeping -----
    def _source_keys(self, module: str) -> list[str]:
        return [k for k in (f"{module}.{s}" for s in
                            ("weight", "bias", "weight_scale", "weight_scale_2", "input_scale", "comfy_quant"))
                if k in self.store]

    def _check_keys(self):
        """Every tensor must belong to a layer or a known parameter: nothing is dropped silently."""
        if self.naming != names.DIFFUSERS:
            return
        used = set(self.names.params.values())
        for spec in self.names.linears.values():
            for m in spec.sources:
                used.update(self._source_keys(m))
        unknown = sorted(self._keys - used)
        if unknown:
            raise CheckpointError("diffusers keys that map to no ComfyUI FLUX parameter", path=self.path,
                                  tensor=unknown[0], found=f"{len(unknown)} unmapped keys: {unknown[:5]}")

    def _param_keys(self) -> dict[str, str]:
        """Non-linear tensors (norm scales, ...): canonical BFL key -> stored key."""
        if self.naming == names.DIFFUSERS:
            return {b: d for b, d in self.names.params.items() if d in self.store}
        used = set()
        for spec in self.names.linears.values():
            used.update(self._source_keys(spec.name))
        return {k: k for k in sorted(self._keys - used)}

    # ----- per-layer format -----
    def _module_format(self, module: str) -> str:
        wkey = f"{module}.weight"
        dtype = self.store.dtype(wkey)
        if self.flavour == COMFY:
            conf = self.quant.comfy_layers.get(module)
            if conf is None:
                if dtype == torch.uint8 or dtype == torch.float8_e4m3fn:
                    raise CheckpointError("quantized weight without a quantization metadata entry",
                                          path=self.store.file_of(wkey), tensor=wkey,
                                          expected="a _quantization_metadata layer entry", found=str(dtype))
                return BF16
            fmt = conf.get("format") if isinstance(conf, dict) else None
            if fmt not in _COMFY_FORMATS:
                raise CheckpointError("unsupported layer format in quantization metadata",
                                      path=self.store.file_of(wkey), tensor=wkey,
                                      expected=sorted(_COMFY_FORMATS), found=fmt)
            return _COMFY_FORMATS[fmt]
        if dtype == torch.uint8:
            if self.flavour == DENSE:
                raise UnknownFlavourError("packed weight in a checkpoint without quantization config",
                                          path=self.path, tensor=wkey)
            return NVFP4
        if dtype == torch.float8_e4m3fn:
            return FP8
        if dtype in _FLOAT_DTYPES:
            if f"{module}.weight_scale" in self.store:
                raise DTypeMismatchError("layer has NVFP4 scales but an unpacked weight",
                                         path=self.store.file_of(wkey), tensor=wkey,
                                         expected="uint8 packed FP4", found=str(dtype))
            return BF16
        raise DTypeMismatchError("unsupported weight dtype", path=self.store.file_of(wkey), tensor=wkey,
                                 expected="uint8, float8_e4m3fn, bf16, fp16 or fp32", found=str(dtype))

    def _layer_info(self, name: str) -> LayerInfo | None:
        spec = self.names.linears[name]
        sources = spec.sources if self.naming == names.DIFFUSERS else (name,)
        present = [f"{m}.weight" in self.store for m in sources]
        if not any(present):
            return None
        if not all(present):
            miss = [m for m, p in zip(sources, present) if not p][0]
            raise MissingTensorError("fused layer is missing one of its parts", path=self.path,
                                     tensor=f"{miss}.weight", expected=f"all of {list(sources)}")
        formats = {self._module_format(m) for m in sources}
        if len(formats) > 1:
            raise CheckpointError("parts of one fused layer have different formats", path=self.path,
                                  tensor=name, found=dict(zip(sources, map(self._module_format, sources))))
        fmt = formats.pop()
        stored, n_total, k = {}, 0, None
        for m in sources:
            for key in self._source_keys(m):
                if not key.endswith("comfy_quant"):
                    stored[key] = self.store.shape(key)
            n, kk = self._check_module_shapes(m, fmt)
            n_total += n
            if k is not None and kk != k:
                raise ShapeMismatchError("parts of one fused layer have different input widths", path=self.path,
                                         tensor=f"{m}.weight", expected=k, found=kk)
            k = kk
        has_bias = [f"{m}.bias" in self.store for m in sources]
        if any(has_bias) and not all(has_bias):
            raise MissingTensorError("some parts of a fused layer have a bias and some not", path=self.path,
                                     tensor=name)
        return LayerInfo(name, fmt, (n_total, k), tuple(sources), all(has_bias),
                         all(f"{m}.input_scale" in self.store for m in sources), stored)

    def _require(self, key: str, what: str):
        if key not in self.store:
            raise MissingTensorError(f"{what} is missing", path=self.path, tensor=key)

    def _check_module_shapes(self, m: str, fmt: str) -> tuple[int, int]:
        """Check stored shapes against the format's rules (headers only); return true (N, K)."""
        wkey = f"{m}.weight"
        f = self.store.file_of(wkey)
        wshape = self.store.shape(wkey)
        if len(wshape) != 2:
            raise ShapeMismatchError("linear weight must be 2-D", path=f, tensor=wkey, found=wshape)
        bias_n = self.store.shape(f"{m}.bias")[0] if f"{m}.bias" in self.store else None
        if fmt != NVFP4:
            if fmt == FP8:
                self._require(f"{m}.weight_scale", "FP8 weight_scale")
            n, k = wshape
            if bias_n is not None and bias_n != n:
                raise ShapeMismatchError("bias does not match the weight", path=f, tensor=f"{m}.bias",
                                         expected=n, found=bias_n)
            return n, k
        if self.store.dtype(wkey) != torch.uint8:
            raise DTypeMismatchError("NVFP4 weight must be packed uint8", path=f, tensor=wkey,
                                     expected="uint8 [N, K/2]", found=str(self.store.dtype(wkey)))
        skey, gkey = f"{m}.weight_scale", f"{m}.weight_scale_2"
        self._require(skey, "NVFP4 block scale (weight_scale)")
        self._require(gkey, "NVFP4 global scale (weight_scale_2)")
        for key in (gkey, f"{m}.input_scale"):
            if key in self.store and self.store.shape(key) not in ((), (1,)):
                raise ShapeMismatchError("scale must be a scalar", path=f, tensor=key, expected="[] or [1]",
                                         found=self.store.shape(key))
        sdt = self.store.dtype(skey)
        if sdt not in (torch.float8_e4m3fn, torch.uint8):
            raise DTypeMismatchError("block scales must be float8_e4m3fn", path=f, tensor=skey,
                                     expected="float8_e4m3fn", found=str(sdt))
        rows, k = wshape[0], wshape[1] * 2
        if k % BLOCK:
            raise UnsupportedShapeError("NVFP4 needs K to be a multiple of 16", path=f, tensor=wkey,
                                        expected="K % 16 == 0", found=f"K = {k}")
        sshape = self.store.shape(skey)
        if self.flavour == MODELOPT:
            n = rows
            want = (n, k // BLOCK)
        else:
            n = bias_n if bias_n is not None else rows
            if round_up(n, 16) != rows:
                raise ShapeMismatchError("padded weight rows do not match the bias", path=f, tensor=wkey,
                                         expected=f"{round_up(n, 16)} rows for N={n}", found=rows)
            want = padded_scale_shape(n, k // BLOCK)
        if tuple(sshape) != tuple(want):
            layout = "linear [N, K/16]" if self.flavour == MODELOPT else "128x4-swizzled [roundup(N,128), roundup(K/16,4)]"
            raise ShapeMismatchError(f"block scale shape does not match the weight ({layout})", path=f,
                                     tensor=skey, expected=list(want), found=list(sshape))
        if bias_n is not None and bias_n != n:
            raise ShapeMismatchError("bias does not match the weight", path=f, tensor=f"{m}.bias",
                                     expected=n, found=bias_n)
        return n, k

    # ----- loading tensors -----
    def _scalar(self, key: str, required: bool) -> torch.Tensor | None:
        if key not in self.store:
            if required:
                self._require(key, "scale")
            return None
        v = self.store.get(key).float().reshape(())
        if not torch.isfinite(v) or v <= 0:
            raise BadScaleError("scale must be finite and positive", path=self.store.file_of(key), tensor=key,
                                found=float(v))
        return v

    def _load_nvfp4_module(self, m: str, n: int, k: int) -> NVFP4Weight:
        f = self.store.file_of(f"{m}.weight")
        packed = self.store.get(f"{m}.weight")
        raw_scale = self.store.get(f"{m}.weight_scale").view(torch.uint8)
        if self.flavour == COMFY:
            packed = e2m1.swap_nibbles(packed[:n, : k // 2])
            raw_scale = unswizzle_128x4(raw_scale, n, k // BLOCK)
        packed = packed.contiguous()
        scale = raw_scale.contiguous().view(torch.float8_e4m3fn)
        bad = (raw_scale & 0x7F) == 0x7F  # e4m3fn NaN
        neg = (raw_scale & 0x80) != 0
        if bad.any() or neg.any():
            r, c = (bad | neg).nonzero()[0].tolist()
            raise BadScaleError("block scale is NaN or negative", path=f, tensor=f"{m}.weight_scale",
                                expected="finite, >= 0", found=f"byte 0x{int(raw_scale[r, c]):02x} at [{r}, {c}]")
        return NVFP4Weight(packed, scale, self._scalar(f"{m}.weight_scale_2", True),
                           self._scalar(f"{m}.input_scale", False))

    def load_linear(self, name: str):
        """The layer in canonical form (NVFP4Linear, FP8Linear or DenseLinear)."""
        info = self.layers[name]
        bias = None
        if info.has_bias:
            bias = torch.cat([self.store.get(f"{m}.bias") for m in info.sources])
        if info.format == NVFP4:
            parts = []
            for m in info.sources:
                n = self._check_module_shapes(m, NVFP4)[0]
                part = self._load_nvfp4_module(m, n, info.shape[1])
                if parts and parts[-1].same_scales(part):
                    parts[-1] = concat_rows([parts[-1], part])
                else:
                    parts.append(part)
            layer = NVFP4Linear(parts, bias)
        elif info.format == FP8:
            (m,) = info.sources
            w = self.store.get(f"{m}.weight")
            layer = FP8Linear(w.view(torch.float8_e4m3fn), self._scalar(f"{m}.weight_scale", True),
                              self._scalar(f"{m}.input_scale", False), bias)
        else:
            layer = DenseLinear(torch.cat([self.store.get(f"{m}.weight") for m in info.sources]), bias)
        spec = self.names.linears[name]
        if spec.swap_halves and self.naming == names.DIFFUSERS:
            layer = swap_row_halves(layer)
        return layer

    def load_param(self, key: str) -> torch.Tensor:
        return self.store.get(self.params[key])

    def is_excluded_by_config(self, name: str) -> bool:
        if not self.quant or not self.quant.exclude:
            return False
        spec = self.names.linears[name]
        return any(fnmatch.fnmatchcase(s, p) or fnmatch.fnmatchcase(name, p)
                   for p in self.quant.exclude for s in spec.sources)

    def file_size(self) -> int:
        return sum(f.stat().st_size for f in self.store.files)

    def summary(self) -> dict:
        counts = {}
        for info in self.layers.values():
            counts[info.format] = counts.get(info.format, 0) + 1
        return {
            "path": str(self.path), "flavour": self.flavour, "architecture": self.architecture,
            "naming": self.naming, "hidden_size": self.hidden_size,
            "layout": {MODELOPT: "low-nibble-first, linear scales",
                       COMFY: "high-nibble-first, 128x4-swizzled scales"}.get(self.flavour, "none"),
            "quant_config": self.quant.source if self.quant else None,
            "layer_counts": counts,
            "missing_input_scale": sorted(n for n, i in self.layers.items()
                                          if i.format != BF16 and not i.has_input_scale),
            "file_bytes": self.file_size(), "files": [str(f) for f in self.store.files],
            "layers": {n: i.to_json() for n, i in self.layers.items()},
            "params": {k: list(self.store.shape(v)) for k, v in self.params.items()},
        }


def open_checkpoint(path, flavour: str | None = None) -> Checkpoint:
    return Checkpoint(path, flavour)
