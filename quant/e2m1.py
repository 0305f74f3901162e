"""FP4 E2M1 codes: encode, decode, and packing two codes per byte.

A code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes below.
"""
from __future__ import annotations

import functools

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0

# Decision points between neighbouring magnitudes and whether a value lying exactly on
# one rounds up. Ties go to the even code index (round half to even on the mantissa).
_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)


@functools.lru_cache(maxsize=None)
def decode_table(dtype=torch.float32, device=None) -> torch.Tensor:
    """The 16 code values: codes 0-7 positive, 8-15 their negatives (8 is -0.0). Made once per
    dtype and device (read-only: callers index it), so decoding copies nothing from the host."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags]).to(dtype)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Round real values to E2M1 codes (uint8 0..15), nearest-even, saturating at +-6.

    The caller has already divided by the block scale. NaN is refused: it has no code.
    """
    if torch.isnan(x).any():
        raise ValueError("E2M1 encode: input contains NaN")
    mag = x.abs().float()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t, up in zip(_THRESHOLDS, _TIE_ROUNDS_UP):
        idx += (mag >= t if up else mag > t).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return idx | sign


def decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) to values."""
    return decode_table(dtype, codes.device)[codes.long()]


def pack(codes: torch.Tensor, low_nibble_first: bool = True) -> torch.Tensor:
    """Pack codes [..., K] (K even) into bytes [..., K/2].

    low_nibble_first=True is the ModelOpt/FlashInfer order (element 2i in bits 0-3);
    False is the ComfyUI/BFL order (element 2i in bits 4-7).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack: last dimension must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    even, odd = c[..., 0::2], c[..., 1::2]
    if low_nibble_first:
        return even | (odd << 4)
    return (even << 4) | odd


def unpack(packed: torch.Tensor, low_nibble_first: bool = True) -> torch.Tensor:
    """Inverse of pack: bytes [..., K/2] to codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    first, second = (lo, hi) if low_nibble_first else (hi, lo)
    return torch.stack([first, second], dim=-1).flatten(-2)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Convert between the two nibble orders (the operation is its own inverse)."""
    return ((packed & 0x0F) << 4) | (packed >> 4)
