"""CPU-side logic of the GPU backends: prepared layouts read back independently, registry rules."""
import numpy as np
import pytest
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.hopper import fp8_weight
from comfyui_nvfp4.kernels.w4a16_layout import w4a16_pack
from comfyui_nvfp4.quant import e2m1, nvfp4


def test_w4a16_layout_reads_back():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (5, 80), generator=g, dtype=torch.uint8)  # K = 160 = 5 chunks of 32
    codes = e2m1.unpack(packed).numpy()
    lay = w4a16_pack(packed)
    assert lay.shape == packed.shape and lay.dtype == torch.uint8
    b = lay.numpy().astype(np.uint32)
    for n in range(5):
        for c in range(5):
            for w in range(4):
                o = c * 16 + 4 * w
                word = b[n, o] | (b[n, o + 1] << 8) | (b[n, o + 2] << 16) | (b[n, o + 3] << 24)  # little-endian
                for i in range(8):  # nibble i: group A (elements 0..15) for i < 4, group B (16..31) above
                    element = c * 32 + 16 * (i // 4) + 4 * (i % 4) + w
                    assert (word >> (4 * i)) & 0xF == codes[n, element]


def test_w4a16_layout_rejects_k_not_multiple_of_32():
    with pytest.raises(ValueError, match="K % 32"):
        w4a16_pack(torch.zeros(4, 40, dtype=torch.uint8))


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
