"""The w4a16 kernel's weight layout (pure torch, so it is prepared and tested on the CPU).

Split-half nibble order per 128-wide K block: byte j of a block holds elements j (low nibble)
and j + 64 (high nibble), instead of the canonical 2j / 2j+1. Same bytes, no extra memory.
"""
from __future__ import annotations

import torch

KBLOCK = 128


def split_half_pack(packed: torch.Tensor) -> torch.Tensor:
    """Canonical low-nibble-first [N, K/2] -> split-half order (K % 128 == 0)."""
    n, half_k = packed.shape
    if (half_k * 2) % KBLOCK:
        raise ValueError(f"split-half layout needs K % {KBLOCK} == 0, got K={half_k * 2}")
    lo, hi = packed & 0x0F, packed >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(n, half_k * 2 // KBLOCK, KBLOCK)
    first, second = codes[..., : KBLOCK // 2], codes[..., KBLOCK // 2:]
    return (first | (second << 4)).reshape(n, half_k).contiguous()
