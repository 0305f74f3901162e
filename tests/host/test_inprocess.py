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



def _tiny_model_with_auto_decisions(tmp_path, monkeypatch, arch, cands, fast):
    """A tiny model through our loader, and `auto` decisions already on disk for its layers (as
    an earlier run would leave them): `fast[kind]` wins each shape timed for that kind of layer."""
    from comfyui_nvfp4.kernels import autotune
    from comfyui_nvfp4.nodes import backend_apply
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model

    monkeypatch.setenv("NVFP4_CACHE_DIR", str(tmp_path))
    autotune.clear_memory()
    bf = tmp_path / "bf.safetensors"
    write_synthetic(bf, FluxDims.tiny(arch), seed=5)
    ck = tmp_path / "q.safetensors"
    quantize_checkpoint(bf, "comfy", ck, progress=False)
    patcher = load_nvfp4_model(ck, "bf16")
    monkeypatch.setattr(autotune, "auto_candidates", lambda device, dtype=None: cands)
    quantized = [m for m in backend_apply.nvfp4_modules(patcher) if m.format == "nvfp4"]

    def measure(n, k, backends, device, token_counts):
        kind = autotune.VECTOR if token_counts == autotune.TOKEN_COUNTS[autotune.VECTOR] else autotune.TOKENS
        return {b.name: 1.0 if b.name == fast[kind] else 2.0 for b in backends}
    keys = {autotune.layer_key(m) for m in quantized}
    table = autotune.choose(keys, torch.device("cpu"), cands, measure)
    autotune.clear_memory()  # the node reads them back from disk
    return patcher, quantized, table


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
def test_auto_chooses_per_shape_and_per_kind_of_layer(comfy, tmp_path, monkeypatch, arch):
    """The Backend node's `auto` keys its choices by shape and by what a layer runs on: the
    modulation layers (fed the conditioning vector, one row per image) and the token layers of
    the same shape (3H x H: single-block modulation and qkv) get their own winners, and sampling
    runs each layer on its own."""
    from comfyui_nvfp4.kernels import autotune, registry
    from comfyui_nvfp4.kernels.module import active_backend
    from comfyui_nvfp4.nodes import backend_apply
    from comfyui_nvfp4.nodes.path_report import path_counts

    cands = [registry.get("dequant"), registry.get("emulate")]  # both run on the CPU
    patcher, quantized, table = _tiny_model_with_auto_decisions(
        tmp_path, monkeypatch, arch, cands, {autotune.VECTOR: "emulate", autotune.TOKENS: "dequant"})
    vector = {m.layer_name for m in quantized if names.vector_fed(m.layer_name)}
    assert vector and len(vector) < len(quantized)
    assert any((n, k, autotune.TOKENS) in table for n, k, kind in table if kind == autotune.VECTOR)

    active, _, text = backend_apply.select(patcher, quantized, "auto", torch.device("cpu"))
    assert active == registry.AUTO and "vector (M=1+16): emulate (cache" in text
    assert {m.layer_name for m in quantized if m.auto_choice == "emulate"} == vector
    dm = patcher.model.diffusion_model
    with active_backend(registry.AUTO):
        out = sample(dm, arch, steps=1)
    counts = path_counts(dm)
    assert torch.isfinite(out).all()
    assert (counts["emulate"], counts["dequant"]) == (len(vector), len(quantized) - len(vector)), counts


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
@pytest.mark.parametrize("fuse", [True, False])
def test_auto_keeps_fusable_blocks_token_layers_on_fp8(comfy, tmp_path, monkeypatch, arch, fuse):
    """With fp8 among `auto`'s candidates and fused blocks on, the token layers of FLUX.1 and
    FLUX.2 blocks stay on fp8 even where another backend timed faster alone (one layer off fp8
    would unfuse its block); the modulation layers keep their own winner. (Selection only: fp8
    itself needs a GPU.)"""
    from comfyui_nvfp4.kernels import autotune, fused_blocks, registry
    from comfyui_nvfp4.nodes import backend_apply

    cands = [registry.get("fp8"), registry.get("dequant")]
    patcher, quantized, _ = _tiny_model_with_auto_decisions(
        tmp_path, monkeypatch, arch, cands, {autotune.VECTOR: "dequant", autotune.TOKENS: "dequant"})
    dm = patcher.model.diffusion_model
    in_blocks = {lin for kind in ("double", "single") for block in getattr(dm, f"{kind}_blocks")
                 if fused_blocks.unfusable_reason(block, kind) is None for lin in fused_blocks.linears(block, kind)}
    assert in_blocks
    _, _, text = backend_apply.select(patcher, quantized, "auto", torch.device("cpu"), fuse_blocks=fuse)
    on_fp8 = {m for m in quantized if m.auto_choice == "fp8"}
    assert on_fp8 == (in_blocks if fuse else set())
    assert all(m.auto_choice == "dequant" for m in quantized if m not in on_fp8)
    if fuse:
        assert f"their {len(in_blocks)} token layers run fp8 ({len(in_blocks)} of them timed faster" in text
    else:
        assert "fused blocks" not in text
