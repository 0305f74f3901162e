"""The 128x4 block-scale layout used by cuBLAS, FlashInfer (cudnn/cutlass/trtllm) and ComfyUI.

A scale matrix S [R, C] is zero-padded to [Rp, Cp] (Rp a multiple of 128, Cp of 4) and
stored so that the 128x4 tile holding S[r, c] is contiguous (512 bytes), with rows
interleaved in groups of 32: see NVFP4_FACTS.md section 5 for the offset formula.
"""
from __future__ import annotations

import torch


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    return round_up(rows, 128), round_up(cols, 4)


def swizzle_128x4(scales: torch.Tensor) -> torch.Tensor:
    """Linear scales [R, C] -> swizzled [Rp, Cp] (padding filled with zeros)."""
    if scales.dim() != 2:
        raise ValueError(f"swizzle_128x4 expects a 2-D scale matrix, got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    rp, cp = padded_scale_shape(rows, cols)
    raw = scales.view(torch.uint8) if scales.element_size() == 1 else scales
    padded = torch.zeros((rp, cp), dtype=raw.dtype, device=raw.device)
    padded[:rows, :cols] = raw
    tiled = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    out = tiled.reshape(rp, cp)
    return out.view(scales.dtype) if raw is not scales else out


def unswizzle_128x4(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Swizzled [Rp, Cp] (or flat) -> linear [rows, cols], padding dropped."""
    rp, cp = padded_scale_shape(rows, cols)
    if swizzled.numel() != rp * cp:
        raise ValueError(
            f"unswizzle_128x4: {swizzled.numel()} elements, expected {rp}x{cp} for a {rows}x{cols} matrix")
    raw = swizzled.view(torch.uint8) if swizzled.element_size() == 1 else swizzled
    tiled = raw.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    out = tiled.reshape(rp, cp)[:rows, :cols].contiguous()
    return out.view(swizzled.dtype) if raw is not swizzled else out
