"""The w4a16 kernels' weight layout (pure torch, so it is prepared and tested on the CPU).

Per row, K is cut into 32-element chunks (16 bytes = four little-endian 32-bit words, two e4m3
scale groups A = elements 0..15 and B = 16..31). Nibble i (bits 4i..4i+3) of word w holds
element 4i + w of group A for i < 4, and element 4(i - 4) + w of group B for i >= 4. Same bytes
and size as the canonical order (element 2j in the low nibble of byte j, 2j + 1 in the high).

Why: one shift-and-mask of a word lands nibbles i and i + 4 in its two 16-bit halves as fp16
bit patterns at once (triton_w4a16.lane_pair), one element of each group; and a thread's
16-byte load is a whole chunk, so each group's 16 products are summed in registers and scaled
once, and the activations a word needs are 4 consecutive elements.
"""
from __future__ import annotations

import torch

CHUNK = 32  # K elements per 16-byte chunk


def w4a16_pack(packed: torch.Tensor) -> torch.Tensor:
    """Canonical low-nibble-first uint8 [N, K/2] -> the w4a16 layout, uint8 [N, K/2] (K % 32 == 0)."""
    n, half_k = packed.shape
    if (half_k * 2) % CHUNK:
        raise ValueError(f"the w4a16 layout needs K % {CHUNK} == 0, got K={half_k * 2}")
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # element order
    # element c*32 + 16 h + 4 i + w -> [n, c, h, i, w] -> [n, c, w, nibble = 4 h + i]
    codes = codes.reshape(n, half_k * 2 // CHUNK, 2, 4, 4).permute(0, 1, 4, 2, 3).reshape(n, -1, 4, 8)
    # byte t of a little-endian word = its nibbles 2t (low) and 2t + 1 (high)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(n, half_k).contiguous()
