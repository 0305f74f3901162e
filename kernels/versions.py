"""Installed packages' version strings as comparable release tuples (no package imported here)."""
from __future__ import annotations


def release(version: str) -> tuple[int, ...]:
    """'3.3.1.post19' -> (3, 3, 1): the first three dot-separated parts, each read as all the
    digits it holds (0 where it holds none: 'unknown' -> (0,); '0+git12' reads 12). Releases put
    their suffixes after the third part (triton-windows' 3.3.1.post19), so the major and minor
    parts the version checks compare come out right."""
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)
