"""Independent reference formulas used by the tests (deliberately not sharing code with the
package: element-wise definitions instead of lookup tables and reshapes)."""
from __future__ import annotations

import numpy as np
import torch


def e2m1_value(code: int) -> float:
    """E2M1 from its bit fields: sign(1) exponent(2) mantissa(1), bias 1."""
    s, e, m = (code >> 3) & 1, (code >> 1) & 3, code & 1
    mag = (m * 0.5) if e == 0 else (2.0 ** (e - 1)) * (1 + m / 2)
    return -mag if s else mag


def byte_values(b: int, low_nibble_first: bool) -> tuple[float, float]:
    lo, hi = b & 0xF, b >> 4
    first, second = (lo, hi) if low_nibble_first else (hi, lo)
    return e2m1_value(first), e2m1_value(second)


def swizzle_offset(r: int, c: int, cp: int) -> int:
    """Byte offset of S[r, c] in the 128x4 layout (NVFP4_FACTS.md section 5)."""
    return (r // 128) * (cp // 4) * 512 + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def unswizzle_by_offset(flat: np.ndarray, rows: int, cols: int) -> np.ndarray:
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = np.zeros((rows, cols), dtype=flat.dtype)
    flat = flat.reshape(-1)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = flat[swizzle_offset(r, c, cp)]
    return out


def e4m3_to_float(b: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes to float64 by bit fields (bias 7, no inf, 0x7F/0xFF NaN)."""
    b = b.astype(np.int64)
    s = (b >> 7) & 1
    e = (b >> 3) & 0xF
    m = b & 7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(s == 1, -mag, mag)


def dequant_stored(packed: torch.Tensor, scales: torch.Tensor, gs: float, n: int, k: int,
                   low_nibble_first: bool, swizzled: bool) -> np.ndarray:
    """Dequantize tensors as stored in a file, by the element-wise definitions (float64)."""
    pk = packed.view(torch.uint8).numpy()
    sc = scales.view(torch.uint8).numpy()
    if swizzled:
        sc = unswizzle_by_offset(sc, n, k // 16)
    sf = e4m3_to_float(sc[:n, : k // 16])
    table = np.array([e2m1_value(c) for c in range(16)])
    lo, hi = table[pk[:n, : k // 2] & 0xF], table[pk[:n, : k // 2] >> 4]
    first, second = (lo, hi) if low_nibble_first else (hi, lo)
    vals = np.stack([first, second], axis=-1).reshape(n, k)
    exact = vals * np.repeat(sf, 16, axis=1)  # e2m1 * e4m3 is exact in float32
    return (exact.astype(np.float32) * np.float32(gs)).astype(np.float64)  # the one fp32 rounding
