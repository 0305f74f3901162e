"""The w4a16 kernels' weight layout (pure torch, so it is prepared and tested on the CPU).

Per row, K is cut into 128-element superchunks of sixteen 32-bit words, and rows into tiles of
TILE_ROWS. Nibble I (bits 4I..4I+3) of word w of a superchunk holds its element 16 I + w, i.e.
element w of scale group I (groups of 16 as the checkpoint's e4m3 block scales). The words are
stored tile by tile: [N / TILE_ROWS, K / 128, TILE_ROWS, 16 words], so the 16 x TILE_ROWS words a
program reads for one superchunk are one contiguous 2 KB block. Rows are padded with zero codes to
a multiple of TILE_ROWS; the bytes are otherwise the canonical ones in another order.

Why: a tile's [16 words, rows] block with nibble I decoded is a [16, rows] tensor-core operand
whose K dimension is exactly scale group I, so the block scale multiplies the product, not each
weight, and the decode is elementwise on the loaded words (Triton keeps them in the operand
layout: no shared-memory round trip of decoded values). Nibbles I and I + 4 sit in the two 16-bit
halves of a word, so one shift-and-mask places both (triton_w4a16.lane_pair, the one-row FMA tile
and the large-M decode). The contiguous tiles measured 3-30% faster than row-major words.
"""
from __future__ import annotations

import torch

SUPER = 128  # K elements per superchunk (16 words, 8 scale groups)
TILE_ROWS = 32  # rows stored together; programs take 1, 2 or 4 tiles


def padded_rows(n: int) -> int:
    return -(-n // TILE_ROWS) * TILE_ROWS


def w4a16_pack(packed: torch.Tensor) -> torch.Tensor:
    """Canonical low-nibble-first uint8 [N, K/2] -> the w4a16 layout, uint8 [padded_rows(N), K/2]
    (K % 128 == 0); the row dimension only sizes the buffer, the order is tile by tile."""
    n, half_k = packed.shape
    k = half_k * 2
    if k % SUPER:
        raise ValueError(f"the w4a16 layout needs K % {SUPER} == 0, got K={k}")
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # [n, k] nibbles in element order
    codes = codes.reshape(n, k // SUPER, 8, 16).transpose(2, 3)  # [n, s, word w, nibble I]
    words = codes[..., 0::2] | (codes[..., 1::2] << 4)  # little-endian byte t = nibbles 2t, 2t + 1
    rows = padded_rows(n)
    if rows != n:
        words = torch.cat([words, words.new_zeros(rows - n, *words.shape[1:])])
    # [tiles, TILE_ROWS, s, 16 words x 4 bytes] -> [tiles, s, TILE_ROWS, 64 bytes]
    tiles = words.reshape(rows // TILE_ROWS, TILE_ROWS, k // SUPER, 64).transpose(1, 2)
    return tiles.reshape(rows, half_k).contiguous()
