"""Turning several NVFP4 parts into one tensor when a file format demands it.

Parts with equal scales concatenate exactly. Parts with different weight_scale_2 (FLUX.1
single-block proj_mlp in ModelOpt exports) can only share one global scale if their block
scales are rescaled, which rounds each block scale to e4m3 once more. That error is measured
and returned, never hidden; the plugin's own runtime keeps such parts separate instead.
"""
from __future__ import annotations

import torch

from .nvfp4 import E4M3_MAX, NVFP4Weight, concat_rows


def merge_parts(parts: list[NVFP4Weight]) -> tuple[NVFP4Weight, float]:
    """One weight for all parts, and the relative L2 error this introduced (0.0 when exact)."""
    if len(parts) == 1:
        return parts[0], 0.0
    if all(parts[0].same_scales(p) for p in parts[1:]):
        return concat_rows(parts), 0.0
    common = torch.stack([p.global_scale.float().reshape(()) for p in parts]).max()
    input_scales = [p.input_scale for p in parts]
    # The largest activation range among the parts: no part's activations are clipped.
    input_scale = None if any(s is None for s in input_scales) else torch.stack(
        [s.float().reshape(()) for s in input_scales]).max()
    rescaled = []
    for p in parts:
        ratio = p.global_scale.float() / common  # <= 1, so no block scale can overflow
        new_scale = (p.block_scale.float() * ratio).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        rescaled.append(NVFP4Weight(p.packed, new_scale, common, input_scale))
    merged = concat_rows(rescaled)
    exact = torch.cat([p.dequantize() for p in parts])
    err = (merged.dequantize() - exact).norm() / exact.norm().clamp(min=1e-30)
    return merged, float(err)


def split_rows(parts: list[NVFP4Weight], sizes: list[int]) -> tuple[list[NVFP4Weight], float]:
    """Cut a (possibly multi-part) layer into consecutive row ranges of the given sizes.

    A range lying inside one part is an exact slice; one spanning parts with different
    scales is merged (see merge_parts) and its error reported (the worst of all ranges).
    """
    bounds, start = [], 0
    for p in parts:
        bounds.append((start, start + p.shape[0], p))
        start += p.shape[0]
    if sum(sizes) != start:
        raise ValueError(f"split_rows: sizes {sizes} do not add up to {start} rows")
    out, worst, lo = [], 0.0, 0
    for size in sizes:
        hi = lo + size
        pieces = [p.rows(max(lo, a) - a, min(hi, b) - a) for a, b, p in bounds if a < hi and b > lo]
        merged, err = merge_parts(pieces)
        out.append(merged)
        worst = max(worst, err)
        lo = hi
    return out, worst
