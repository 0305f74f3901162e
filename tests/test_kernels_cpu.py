"""CPU-side logic of the GPU backends: prepared layouts read back independently, registry rules."""
import numpy as np
import pytest
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.hopper import fp8_weight
from comfyui_nvfp4.kernels.w4a16_layout import w4a16_pack
from comfyui_nvfp4.quant import e2m1, nvfp4


def test_w4a16_layout_reads_back():
    """Every nibble found where the layout's description says: tile t, superchunk s, row r, word
    w at byte ((t * S + s) * 32 + r) * 64 + 4 w of the buffer, nibble I = element 128 s + 16 I + w
    of row 32 t + r; rows past N are zero codes."""
    g = torch.Generator().manual_seed(0)
    n, k = 37, 384  # 2 tiles of 32 rows (the second one padded), 3 superchunks
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    codes = e2m1.unpack(packed).numpy()
    lay = w4a16_pack(packed)
    assert lay.shape == (64, k // 2) and lay.dtype == torch.uint8
    b = lay.numpy().reshape(-1).astype(np.uint32)
    supers = k // 128
    for row in range(64):
        t, r = divmod(row, 32)
        for s in range(supers):
            for w in range(16):
                o = ((t * supers + s) * 32 + r) * 64 + 4 * w
                word = b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)  # little-endian
                for i in range(8):
                    expected = codes[row, 128 * s + 16 * i + w] if row < n else 0
                    assert (word >> (4 * i)) & 0xF == expected, (row, s, w, i)


def test_w4a16_layout_rejects_k_not_multiple_of_128():
    with pytest.raises(ValueError, match="K % 128"):
        w4a16_pack(torch.zeros(4, 80, dtype=torch.uint8))


def test_fp8_weight_conversion_on_cpu():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    parts = [nvfp4.quantize(w[:20]), nvfp4.quantize(w[20:] * 3)]  # different weight_scale_2
    q, s = fp8_weight(parts, torch.device("cpu"))
    ref = torch.cat([p.dequantize() for p in parts])
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert float((q.float() * s[:, None] - ref).norm() / ref.norm()) < 0.03


def test_gpu_backends_report_why_not_on_cpu():
    av = {a.name: a for a in registry.availability(torch.device("cpu"))}
    assert not av["fp8"].available and "CUDA" in av["fp8"].reason
    assert not av["w4a16"].available and "CUDA" in av["w4a16"].reason
    assert av["dequant"].available and av["emulate"].available
    # auto never picks the accuracy tool
    assert registry.resolve("auto", torch.device("cpu")).name == "dequant"
