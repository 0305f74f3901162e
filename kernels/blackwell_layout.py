"""Weight layouts FlashInfer's mm_fp4 backends read, made from the canonical form in pure torch.

cudnn / cutlass: N and K padded to multiples of 32; block scales padded to
  [roundup(N,128), roundup(K/16,4)] and 128x4-swizzled.
trtllm: N padded to 128 and the scale columns to 4 (the weight's K grows by 8 bytes per padded
  scale column); weight rows permuted by the TRT-LLM row shuffle (epilogue tile 128, blocks of
  32); the LINEAR scales get the same row permutation, then the 128x4 swizzle.
All are permutations and zero padding: they run on the CPU (or GPU) one layer at a time.
"""
from __future__ import annotations

import torch

from ..quant.nvfp4 import BLOCK
from ..quant.swizzle import round_up, swizzle_128x4

CUDNN, CUTLASS, TRTLLM = "cudnn", "cutlass", "trtllm"
SHUFFLE_BLOCK = 32


def padded_dims(backend: str, n: int, k: int) -> tuple[int, int]:
    """(N, K) of the prepared weight."""
    if backend == TRTLLM:
        return round_up(n, 128), round_up(k // BLOCK, 4) * BLOCK
    return round_up(n, 32), round_up(k, 32)


def trtllm_row_order(rows: int) -> torch.Tensor:
    """Source row of each destination row: out[j] = in[(j//32)*32 + (j%8)*4 + (j%32)//8]."""
    if rows % SHUFFLE_BLOCK:
        raise ValueError(f"trtllm row shuffle needs rows % {SHUFFLE_BLOCK} == 0, got {rows}")
    j = torch.arange(rows)
    return (j // 32) * 32 + (j % 8) * 4 + (j % 32) // 8


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def prepare_weight(backend: str, packed: torch.Tensor, block_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical packed [N, K/2] (low nibble first) + linear e4m3 scales [N, K/16] ->
    {"weight": uint8 [Np, Kp/2], "scale": uint8 [roundup(Np,128), roundup(Kp/16,4)] swizzled}."""
    n, half_k = packed.shape
    k = half_k * 2
    np_, kp = padded_dims(backend, n, k)
    w = _pad(packed, np_, kp // 2)
    s = _pad(block_scale.view(torch.uint8), np_, kp // BLOCK)
    if backend == TRTLLM:
        order = trtllm_row_order(np_).to(packed.device)
        w = w[order]
        s = s[order]
    return {"weight": w.contiguous(), "scale": swizzle_128x4(s).contiguous()}
