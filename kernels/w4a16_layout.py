"""The w4a16 kernels' weight layout (pure torch, so it is prepared and tested on the CPU).

Codes. Per row, K is cut into 128-element superchunks (8 scale groups of 16) of sixteen 32-bit
words. Word w of a superchunk holds, for pair p = w // 2 and half h = w % 2, the elements
16 i + 2p and 16 i + 2p + 1 of the four groups i = 4h + j (j = 0..3): 8 nibbles. Each nibble's
4 bits (magnitude bits 0-2, sign bit 3) sit where one left rotation of the word by ROTATION[j][bit]
puts them at bf16 bit positions: magnitude at 6-8 and sign at 15 for element 2p (low half),
22-24 and 31 for element 2p + 1 (high half). Those 16 bits are e2m1 * 2^-126 as two bf16 values
(the e = 0 codes are bf16 subnormals), so decoding one group's pair of weights costs one rotate,
one mask and one multiply (by the block scale, below); j = 3 takes two rotates and masks.
Words are stored 32 rows at a time, [N / TILE_ROWS, K / 128, TILE_ROWS, 16 words], so a
program's tile of one superchunk is one contiguous 2 KB block; rows are padded with zero codes.

Scales. One byte per block as the e4m3 scale s, re-encoded so that (u << 4) | SCALE_BIAS is the
bf16 bit pattern of |s| * 2^106 (u = (bf16 exponent - 224) * 8 + the 3 mantissa bits: e4m3's
exponents 2^-9..2^8 land on 224..241, so the bias is an OR and decoding a scale is a shift and
one logic op). Decoded weight = e2m1 * 2^-126 * |s| * 2^106 = e2m1 * |s| * 2^-20, exact in bf16
(2^-30..2^-8.7, normal); the kernels multiply by weight_scale_2 * 2^20 at the end. A negative scale flips its block's
code signs, a zero scale zeroes its block's codes (u = 0 then); a NaN scale is refused. Stored
like the codes, [N / TILE_ROWS, K / 128, TILE_ROWS, 8 bytes]: a superchunk's scales of a tile are
one contiguous 256-byte block. Same bytes as the canonical codes and scales, plus row padding.
"""
from __future__ import annotations

import functools

import torch

SUPER = 128  # K elements per superchunk (16 words, 8 scale groups)
TILE_ROWS = 32  # rows stored together; programs take 1, 2 or 4 tiles
# left rotation that decodes bit b (0-2 magnitude, 3 sign) of the nibble in field j of a word
ROTATION = ((0, 0, 0, 0), (4, 4, 4, 4), (10, 10, 10, 10), (6, 14, 14, 14))
TARGET_BIT = (6, 7, 8, 15)  # bf16 bit of e2m1 * 2^-126 for each nibble bit (low half; +16 high)
SCALE_SHIFT = 106  # a scale byte decodes to |s| * 2^SCALE_SHIFT in bf16
SCALE_EXP = 224  # bf16 exponent of the scale byte u = 0 (|s| = 2^-9, e4m3's smallest, * 2^106)
SCALE_BIAS = SCALE_EXP << 7  # OR-ed onto u << 4: bf16 bits of |s| * 2^106
WEIGHT_FACTOR = 2.0 ** (126 - SCALE_SHIFT)  # decoded weights, e2m1 * 2^-126 * that, are e2m1 * scale / 2^20


def padded_rows(n: int) -> int:
    return -(-n // TILE_ROWS) * TILE_ROWS


def _tiled(per_row: torch.Tensor, n: int) -> torch.Tensor:
    """[n, superchunks, B] -> rows padded with zeros, stored [tiles, superchunks, TILE_ROWS, B]."""
    rows = padded_rows(n)
    if rows != n:
        per_row = torch.cat([per_row, per_row.new_zeros(rows - n, *per_row.shape[1:])])
    tiles = per_row.reshape(rows // TILE_ROWS, TILE_ROWS, per_row.shape[1], -1).transpose(1, 2)
    return tiles.reshape(rows, -1).contiguous()


def check_packable(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[int, int]:
    """(N, K) of canonical codes and block scales the layout can hold; a clear error otherwise,
    a NaN scale included (one device sync)."""
    n, half_k = packed.shape
    k = half_k * 2
    if k % SUPER:
        raise ValueError(f"the w4a16 layout needs K % {SUPER} == 0, got K={k}")
    if tuple(block_scale.shape) != (n, k // 16) or block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"the w4a16 layout needs {n}x{k // 16} e4m3 block scales, got {block_scale.dtype} "
                         f"{tuple(block_scale.shape)}")
    if packed.dtype != torch.uint8 or packed.stride(1) != 1 or block_scale.stride(1) != 1:
        raise ValueError(f"the w4a16 layout needs uint8 codes and scales with contiguous rows, got codes "
                         f"{packed.dtype} strides {packed.stride()}, scales strides {block_scale.stride()}")
    nan = (block_scale.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn's only NaN encodings
    if nan.any():
        r, g = (int(v) for v in torch.nonzero(nan)[0])
        raise ValueError(f"block scale of row {r}, group {g} is NaN: the weight would be NaN")
    return n, k


def encode_scales(block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 scales [N, K/16] -> (u bytes [N, K/16], blocks whose code signs flip, blocks zeroed)."""
    s = block_scale.float()
    bits = (s.abs() * 2.0 ** SCALE_SHIFT).to(torch.bfloat16).view(torch.int16).int()
    zero = s == 0
    u = (((bits >> 7) - SCALE_EXP) << 3) | ((bits >> 4) & 7)
    return torch.where(zero, 0, u).to(torch.uint8), s < 0, zero


@functools.lru_cache(maxsize=None)
def _placement(device: torch.device) -> torch.Tensor:
    """int32 [8 fields (j, eh), 16 codes]: the word bits each code of each field sets (made once
    per device: every layer's packing reads it)."""
    table = torch.zeros(8, 16, dtype=torch.int64)
    code = torch.arange(16)
    for j in range(4):
        for eh in range(2):
            for b in range(4):
                table[2 * j + eh] |= ((code >> b) & 1) << ((TARGET_BIT[b] + 16 * eh - ROTATION[j][b]) % 32)
    return torch.where(table >= 1 << 31, table - (1 << 32), table).to(torch.int32).to(device)  # the same 32 bits


def w4a16_pack(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical low-nibble-first codes uint8 [N, K/2] and e4m3 block scales [N, K/16] -> the
    w4a16 codes (uint8 [padded_rows(N), K/2]) and scales (uint8 [padded_rows(N), K/16]), K % 128 == 0;
    the row dimension only sizes the buffers, the order is tile by tile."""
    n, k = check_packable(packed, block_scale)
    u, negative, zero = encode_scales(block_scale)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k // 16, 16)
    codes = torch.where(zero[..., None], 0, codes ^ (negative[..., None].to(torch.uint8) << 3))
    # [n, s, group i = 4h + j, pair p, element eh] -> [n, s, p, h, field (j, eh)]
    codes = codes.reshape(n, k // SUPER, 2, 4, 8, 2).permute(0, 1, 4, 2, 3, 5).reshape(n, k // SUPER, 8, 2, 8)
    table = _placement(packed.device)
    words = table[0][codes[..., 0].long()]
    for field in range(1, 8):  # each field's word bits from the table
        words |= table[field][codes[..., field].long()]
    words = words.reshape(n, k // SUPER, 16).view(torch.uint8)  # little-endian bytes
    return _tiled(words, n), _tiled(u.reshape(n, k // SUPER, 8), n)
