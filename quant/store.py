"""Lazy, read-only access to the tensors of one or more safetensors files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, TruncatedFileError

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorStore:
    """Keys of several files as one mapping; tensors are read only when asked for."""

    def __init__(self, files: list[Path], strip: str = ""):
        self.files = [Path(f) for f in files]
        self._handles = {}
        self._layouts: dict[Path, tuple[int, dict]] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            h = self._open(f)
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                name = k[len(strip):] if strip and k.startswith(strip) else k
                if name in self._where:
                    raise CheckpointError("tensor appears in two files", path=f, tensor=name,
                                          found=str(self._where[name][0]))
                self._where[name] = (f, k)

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.is_file():
                raise CheckpointError("file not found", path=f)
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except SafetensorError as e:
                msg = str(e)
                cls = TruncatedFileError if ("incomplete" in msg or "not fully covered" in msg
                                             or "too small" in msg) else CheckpointError
                raise cls("not a readable safetensors file (truncated or corrupt?)", path=f,
                          found=msg) from None
            except OSError as e:
                raise CheckpointError("cannot read file", path=f, found=str(e)) from None
        return self._handles[f]

    def restrip(self, strip: str) -> "TensorStore":
        return TensorStore(self.files, strip) if strip else self

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def _slice(self, key):
        f, raw = self._where[key]
        return self._handles[f].get_slice(raw)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name not in _DTYPES:
            raise CheckpointError("unsupported tensor dtype", path=self.file_of(key), tensor=key, found=name)
        return _DTYPES[name]

    def _layout(self, f: Path) -> tuple[int, dict]:
        """(offset of the data section, header entries) of a file safe_open already validated."""
        if f not in self._layouts:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                self._layouts[f] = (8 + n, json.loads(fh.read(n)))
        return self._layouts[f]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor with a plain read into fresh memory.

        safe_open's get_tensor goes through a memory map whose touched pages stay resident,
        so loading a whole checkpoint that way peaks at twice its size; this peaks at once.
        """
        f, raw = self._where[key]
        base, header = self._layout(f)
        entry = header[raw]
        start, end = entry["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(f, "rb") as fh:
            fh.seek(base + start)
            got = fh.readinto(memoryview(buf.numpy())) if end > start else 0
        if got != end - start:
            raise TruncatedFileError("tensor data cannot be read", path=f, tensor=key,
                                     expected=f"{end - start} bytes", found=f"{got} bytes")
        return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_json(self, key: str):
        return json.loads(self.get(key).numpy().tobytes().decode("utf-8"))

    def close(self):
        self._handles.clear()
