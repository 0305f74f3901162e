"""ComfyUI imported in this process: a tiny FLUX loaded through our loader, sampled with the
Blackwell mm_fp4 path on the CPU read-back emulator, equals the `emulate` backend."""

import pytest
import torch

from comfyui_nvfp4.quant import names, quantize_checkpoint
from comfyui_nvfp4.quant.shapes import FluxDims
from comfyui_nvfp4.quant.synthetic import write_synthetic
from readback import ReadbackOps


def sample(dm, arch, steps=3, seed=0):
    """Flow-matching Euler on the raw diffusion model, float32 timesteps and guidance."""
    g = torch.Generator().manual_seed(seed)
    ch = 16 if arch == names.FLUX1 else 128
    x = torch.randn(1, ch, 8, 8, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 8, 64, generator=g).to(torch.bfloat16)
    y = torch.randn(1, 32, generator=g).to(torch.bfloat16) if arch == names.FLUX1 else None
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.inference_mode():
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = dm(x, t.reshape(1), ctx, y=y, guidance=torch.tensor([3.5]))
            x = (x.float() + (t_next - t) * v.float()).to(torch.bfloat16)
    return x.float()


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
@pytest.mark.parametrize("backend", ["cutlass", "trtllm"])
def test_mm_fp4_readback_sampling_equals_emulate(comfy, tmp_path, arch, backend):
    from comfyui_nvfp4.kernels import blackwell, preparation, registry
    from comfyui_nvfp4.kernels.module import active_backend
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model
    from comfyui_nvfp4.nodes.path_report import linear_modules, path_counts

    bf = tmp_path / "bf.safetensors"
    write_synthetic(bf, FluxDims.tiny(arch), seed=5)
    ck = tmp_path / "q.safetensors"
    quantize_checkpoint(bf, "comfy", ck, progress=False)
    dm = load_nvfp4_model(ck, "bf16").model.diffusion_model
    with blackwell.use_ops(ReadbackOps()):
        info = preparation.prepare_modules(linear_modules(dm), registry.get(backend), torch.device("cpu"),
                                           self_check=True)
        assert info["self_check_min_cosine"] > 0.98
        with active_backend(backend):
            got = sample(dm, arch)
            got1 = sample(dm, arch, steps=1)
    assert path_counts(dm)[backend] == info["prepared_layers"] > 0
    out = {}
    for name in ("emulate", "dequant"):
        with active_backend(name):
            out[name] = sample(dm, arch)
            out[name + "1"] = sample(dm, arch, steps=1)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert torch.isfinite(got).all()
    # The same W4A4 numerics (emulate follows FlashInfer's quantization recipe): one step agrees
    # up to bf16 rounding order; over three steps those differences grow along the trajectory but
    # stay below what activation quantization itself changes (emulate vs dequant). A wrong layout
    # would be ~100%.
    w4a4 = rel(out["emulate"], out["dequant"])
    assert rel(got1, out["emulate1"]) < 2e-3
    err = rel(got, out["emulate"])
    assert err < 2e-2 and err < w4a4, (err, w4a4)


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
@pytest.mark.parametrize("source", ["quantized", "converted from ModelOpt"])
def test_stock_comfyui_dequantizes_our_comfy_files_exactly(comfy, tmp_path, arch, source):
    """ComfyUI's own loader (no plugin code) reads a ComfyUI-format file we wrote; the weights it
    dequantizes equal ours, layer by layer (float32 model, so nothing rounds but the product)."""
    import comfy.sd

    from comfyui_nvfp4.quant import Checkpoint, convert_checkpoint

    bf = tmp_path / "bf"
    write_synthetic(bf, FluxDims.tiny(arch), seed=9, naming=names.DIFFUSERS)
    out = tmp_path / "c.safetensors"
    if source == "quantized":
        quantize_checkpoint(bf, "comfy", out, progress=False)
    else:
        quantize_checkpoint(bf, "modelopt", tmp_path / "mo", progress=False)
        rep = convert_checkpoint(tmp_path / "mo", "comfy", out, progress=False)
    ours = Checkpoint(out)
    patcher = comfy.sd.load_diffusion_model(str(out), model_options={"dtype": torch.float32})
    dm = patcher.model.diffusion_model
    checked = 0
    for name, info in ours.layers.items():
        mod = dm.get_submodule(name)
        w = mod.weight
        theirs = w.dequantize() if hasattr(w, "dequantize") else w
        mine = ours.load_linear(name).dequantize(torch.float32)
        if info.format == "nvfp4":
            assert type(w).__name__ == "QuantizedTensor", name  # ComfyUI kept it as NVFP4
            checked += 1
        assert tuple(theirs.shape) == tuple(mine.shape), name
        assert torch.allclose(theirs.float(), mine, rtol=1e-6, atol=1e-12), name
    assert checked >= 10
    if source != "quantized" and arch == names.FLUX1:
        assert rep.rescaled  # the only lossy step, measured and reported at conversion time
