"""CPU-side logic of the GPU backends: prepared layouts read back independently, registry rules."""
import numpy as np
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.hopper import fp8_weight
from comfyui_nvfp4.kernels.w4a16_layout import split_half_pack
from comfyui_nvfp4.quant import e2m1, nvfp4


def test_split_half_layout_reads_back():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (5, 192), generator=g, dtype=torch.uint8)  # K = 384 = 3 blocks
    codes = e2m1.unpack(packed).numpy()
    sp = split_half_pack(packed).numpy()
    for n in range(5):
        for blk in range(3):
            for j in range(64):
                byte = sp[n, blk * 64 + j]
                assert byte & 0xF == codes[n, blk * 128 + j]
                assert byte >> 4 == codes[n, blk * 128 + 64 + j]


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
