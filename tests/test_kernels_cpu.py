"""CPU-side logic of the GPU backends: prepared layouts read back independently, registry rules."""
import numpy as np
import pytest
import torch

from comfyui_nvfp4.kernels import registry
from comfyui_nvfp4.kernels.hopper import fp8_weight
from comfyui_nvfp4.kernels.w4a16_layout import ROTATION, w4a16_pack
from comfyui_nvfp4.quant import nvfp4


def _w4a16_weight(n, k, seed):
    """Random codes and e4m3 block scales with negative, zero and subnormal scales among them."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    raw = torch.randint(0, 256, (n, k // 16), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x38  # no NaN scales (1.0 instead)
    raw[::5, ::3] = 0  # zero scales over non-zero codes
    raw[1::4, 1::2] &= 0x07  # subnormal (and zero) scales
    return packed, raw.view(torch.float8_e4m3fn)


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF if r else x


def _bf16(bits16):
    return float(np.array([bits16 << 16], dtype=np.uint32).view(np.float32)[0])


def test_w4a16_layout_reads_back():
    """Read the layout as its description says, independently of how it was written: tile t,
    superchunk s, row r: word w at byte ((t * S + s) * 32 + r) * 64 + 4 w of the codes, scale
    byte i at ((t * S + s) * 32 + r) * 8 + i. Word w holds group i = 4 (w % 2) + j's elements
    2 (w // 2) and 2 (w // 2) + 1; rotated left by ROTATION[j][bit], each nibble bit lands on
    its bf16 bit (6, 7, 8, 15; +16 for the second element). The bf16 value times the decoded
    scale ((u << 4) | 224 << 7 as bf16) is e2m1 * scale / 2^20 for every element: sign and zero
    scales folded into the codes; rows past N decode to 0."""
    n, k = 37, 384  # 2 tiles of 32 rows (the second one padded), 3 superchunks
    packed, scale = _w4a16_weight(n, k, seed=0)
    codes, scales = w4a16_pack(packed, scale)
    assert codes.shape == (64, k // 2) and scales.shape == (64, k // 16)
    assert codes.dtype == scales.dtype == torch.uint8
    want = nvfp4.NVFP4Weight(packed, scale, torch.tensor(1.0)).dequantize(torch.float64).numpy()
    cb = codes.numpy().reshape(-1).astype(np.uint64)
    sb = scales.numpy().reshape(-1).astype(np.uint64)
    supers = k // 128
    for row in range(64):
        t, r = divmod(row, 32)
        for s in range(supers):
            base = (t * supers + s) * 32 + r
            for w in range(16):
                o = base * 64 + 4 * w
                word = int(cb[o] | (cb[o + 1] << 8) | (cb[o + 2] << 16) | (cb[o + 3] << 24))  # little-endian
                for j in range(4):
                    i = 4 * (w % 2) + j
                    scale_bf16 = _bf16((int(sb[base * 8 + i]) << 4) | (224 << 7))
                    for eh in range(2):
                        bits = 0
                        for b, target in enumerate((6, 7, 8, 15)):
                            bits |= _rotl(word, ROTATION[j][b]) & (1 << (target + 16 * eh))
                        got = _bf16(bits >> (16 * eh)) * scale_bf16 * 2.0 ** 20
                        e = 128 * s + 16 * i + 2 * (w // 2) + eh
                        assert got == (want[row, e] if row < n else 0.0), (row, s, w, j, eh)


def test_w4a16_layout_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="K % 128"):
        w4a16_pack(torch.zeros(4, 80, dtype=torch.uint8), torch.zeros(4, 10, dtype=torch.float8_e4m3fn))
    packed, scale = _w4a16_weight(8, 256, seed=1)
    with pytest.raises(ValueError, match="8x16 e4m3 block scales"):
        w4a16_pack(packed, scale[:, :8])
    raw = scale.view(torch.uint8).clone()
    raw[3, 5] = 0xFF  # NaN
    with pytest.raises(ValueError, match="row 3, group 5 is NaN"):
        w4a16_pack(packed, raw.view(torch.float8_e4m3fn))


def test_w4a16_backend_names_the_layer_with_a_nan_scale():
    from comfyui_nvfp4.kernels.hopper import W4A16Backend
    from comfyui_nvfp4.kernels.module import NVFP4LinearModule
    from comfyui_nvfp4.quant.layers import NVFP4Linear
    p = nvfp4.quantize(torch.randn(8, 256))
    raw = p.block_scale.view(torch.uint8).clone()
    raw[2, 1] = 0x7F
    m = NVFP4LinearModule(256, 8, bias=False)
    m.layer_name = "double_blocks.0.img_mod.lin"
    m.set_layer(NVFP4Linear([nvfp4.NVFP4Weight(p.packed, raw.view(torch.float8_e4m3fn), p.global_scale)], None))
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_mod\.lin part 0: block scale of row 2, group 1 is NaN"):
        W4A16Backend().prepare(m)


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
