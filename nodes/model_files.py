"""Which checkpoints the loader offers: .safetensors files and diffusers folders (pure Python)."""
from __future__ import annotations

import os
from pathlib import Path

WEIGHT_EXT = ".safetensors"


def is_diffusers_folder(p: Path) -> bool:
    if (p / "transformer").is_dir():
        p = p / "transformer"
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def list_checkpoints(folders: list[str]) -> list[str]:
    """Names relative to their models folder: files anywhere below, and folders with a config.json."""
    found: set[str] = set()
    for root in folders:
        root_p = Path(root)
        if not root_p.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root_p, followlinks=True):
            d = Path(dirpath)
            if d != root_p and is_diffusers_folder(d):
                found.add(d.relative_to(root_p).as_posix())
                dirnames[:] = []  # a folder checkpoint's own files are not listed one by one
                continue
            for f in filenames:
                if f.endswith(WEIGHT_EXT) and not f.startswith("."):
                    found.add((d / f).relative_to(root_p).as_posix())
    return sorted(found)


def resolve_checkpoint(folders: list[str], name: str) -> Path:
    for root in folders:
        p = Path(root) / name
        if p.exists():
            return p
    raise FileNotFoundError(f"NVFP4 checkpoint '{name}' not found in {folders}")
