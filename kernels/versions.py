"""Installed packages' version strings as comparable release tuples (no package imported here)."""
from __future__ import annotations

import re


def release(version: str) -> tuple[int, ...]:
    """'3.3.1.post19' -> (3, 3, 1): the first three dot-separated parts, each read as the number it
    starts with (0 where it starts with none: 'unknown' -> (0,)), so local and pre-release tails
    ('2.11.0+cu130', '1.13.0rc1') drop off and triton-windows' fourth part (.post19) is never read."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:3])
