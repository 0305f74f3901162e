"""The fused-block replacements (nodes/block_patches.py) inside a real ComfyUI model, on the CPU:
which blocks they take, how they sit in ModelPatcher options next to another node's, and that a
call they cannot fuse (here: no CUDA) runs ComfyUI's own block and gives its exact result.
The fused forward itself is compared with ComfyUI's blocks on the GPU (tests/gpu/test_fused_blocks.py)."""

import pytest
import torch

from comfyui_nvfp4.quant import names, quantize_checkpoint
from comfyui_nvfp4.quant.shapes import FluxDims
from comfyui_nvfp4.quant.synthetic import write_synthetic


def load(tmp_path, arch):
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model
    bf = tmp_path / f"{arch}.safetensors"
    write_synthetic(bf, FluxDims.tiny(arch), seed=3)
    ck = tmp_path / f"{arch}_q.safetensors"
    quantize_checkpoint(bf, "comfy", ck, progress=False)
    return load_nvfp4_model(ck, "bf16")


def dit(patcher):
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def test_flux1_and_flux2_blocks_are_replaced(comfy, tmp_path):
    from comfyui_nvfp4.kernels import fused_blocks
    from comfyui_nvfp4.nodes import block_patches
    for arch, act in ((names.FLUX1, fused_blocks.GELU), (names.FLUX2, fused_blocks.SWIGLU)):
        m = load(tmp_path, arch).clone()
        dm = m.model.diffusion_model
        text = block_patches.install(m)
        assert text == f"fused fp8 blocks: {len(dm.double_blocks) + len(dm.single_blocks)}", (arch, text)
        assert set(dit(m)) == {("double_block", i) for i in range(len(dm.double_blocks))} | \
            {("single_block", i) for i in range(len(dm.single_blocks))}
        # FLUX.1: GELU MLPs, each block its own modulation; FLUX.2: SiLU-gated MLPs, the model's
        assert {fused_blocks._mlp_activation(b.img_mlp) for b in dm.double_blocks} == {act}
        assert {fused_blocks._single_activation(b) for b in dm.single_blocks} == {act}
        assert fused_blocks._own_modulation(dm.double_blocks[0], "double") == (arch == names.FLUX1)


def test_blocks_of_other_shapes_are_left_to_comfyui(comfy, tmp_path):
    """A block whose MLP is not one the fused forward computes keeps ComfyUI's forward, and the
    node's text says why."""
    from comfyui_nvfp4.nodes import block_patches
    m = load(tmp_path, names.FLUX2).clone()
    dm = m.model.diffusion_model
    dm.double_blocks[0].img_mlp[1] = torch.nn.GELU()  # exact GELU: not the tanh one FLUX.1 uses
    dm.single_blocks[0].yak_mlp = True
    text = block_patches.install(m)
    n = len(dm.double_blocks) + len(dm.single_blocks)
    assert text == (f"fused fp8 blocks: {n - 2} (not fused: 1 img_mlp is neither Linear-GELU(tanh)-Linear nor "
                    f"Linear-SiLU gate-Linear; 1 the MLP is neither GELU(tanh) nor a SiLU gate of matching width)")
    assert ("double_block", 0) not in dit(m) and ("single_block", 0) not in dit(m)


def test_other_nodes_replacements_are_kept_and_ours_removed_without_touching_the_source(comfy, tmp_path):
    from comfyui_nvfp4.nodes import block_patches
    base = load(tmp_path, names.FLUX1)

    def theirs(args, extra):
        return extra["original_block"](args)
    other = base.clone()
    other.set_model_patch_replace(theirs, "dit", "double_block", 0)
    ours = other.clone()
    text = block_patches.install(ours)
    assert "1 replaced by another node" in text
    assert dit(ours)[("double_block", 0)] is theirs
    assert getattr(dit(ours)[("single_block", 0)], "nvfp4_fused", False)
    again = ours.clone()
    block_patches.remove(again)
    assert dit(again) == {("double_block", 0): theirs}
    assert len(dit(ours)) > 1 and len(dit(other)) == 1  # clones share nothing we changed


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
def test_unfusable_call_runs_comfyui_block_exactly(comfy, tmp_path, arch):
    from comfyui_nvfp4.kernels import fused_blocks
    from comfyui_nvfp4.kernels.module import active_backend
    from comfyui_nvfp4.nodes import block_patches
    patcher = load(tmp_path, arch)
    dm = patcher.model.diffusion_model
    patches, skipped = block_patches.block_patches(dm)
    assert not skipped
    blk = dm.single_blocks[0]
    x = torch.randn(1, 16, dm.hidden_size).bfloat16()
    vec = torch.zeros(1, dm.hidden_size)
    if arch == names.FLUX2:
        vec = dm.single_stream_modulation(vec)[0]
    assert "runs 'dequant'" in fused_blocks.not_now_reason(blk, "single", x, vec, x, {})
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(1, 16 if arch == names.FLUX1 else 128, 8, 8, generator=g).bfloat16(),
                  timestep=torch.tensor([0.5]), context=torch.randn(1, 8, 64, generator=g).bfloat16(),
                  y=torch.randn(1, 32, generator=g).bfloat16() if arch == names.FLUX1 else None,
                  guidance=torch.tensor([3.5]))
    block_patches._LOGGED.clear()
    with torch.inference_mode(), active_backend("dequant"):
        plain = dm(**inputs)
        assert not block_patches._LOGGED
        patched = dm(**inputs, transformer_options={"patches_replace": {"dit": patches}})
    assert torch.equal(plain, patched)
    # the patches ran, found the call unfusable and said why
    assert {k.split(":")[0] for k in block_patches._LOGGED} == {"double", "single"}


def test_flux2_modulation_split_per_token_range_is_named(comfy, tmp_path):
    """FLUX.2 passes its blocks the model's modulation; with reference latents at timestep zero
    ComfyUI splits the image's into two ([B, 2, C]): that call runs ComfyUI's block."""
    from comfyui_nvfp4.kernels import fused_blocks
    dm = load(tmp_path, names.FLUX2).model.diffusion_model
    h = dm.hidden_size
    x = torch.zeros(1, 16, h).bfloat16()
    vec = torch.zeros(1, h)
    with torch.inference_mode():
        img, txt = dm.double_stream_modulation_img(vec), dm.double_stream_modulation_txt(vec)
        split = dm.double_stream_modulation_img(torch.zeros(1, 2, h))
        single, _ = dm.single_stream_modulation(vec)
    assert fused_blocks._modulation_reason(dm.double_blocks[0], "double", x, (img, txt)) is None
    assert fused_blocks._modulation_reason(dm.single_blocks[0], "single", x, single) is None
    assert fused_blocks._modulation_reason(dm.double_blocks[0], "double", x, (split, txt)) == \
        "per-token modulation (reference latents with timestep zero)"
    assert fused_blocks._modulation_reason(dm.double_blocks[0], "double", x, vec).startswith(
        "unexpected modulation input")
    assert fused_blocks._modulation_reason(dm.single_blocks[0], "single", torch.zeros(2, 16, h), single) \
        .startswith("unexpected modulation shapes")


def test_each_reason_to_run_comfyui_block_is_named(comfy, tmp_path):
    from comfyui_nvfp4.kernels import fused_blocks, registry
    from comfyui_nvfp4.kernels.module import active_backend
    dm = load(tmp_path, names.FLUX1).model.diffusion_model
    blk = dm.single_blocks[0]
    x = torch.zeros(1, 16, dm.hidden_size).bfloat16()
    vec = torch.zeros(1, dm.hidden_size).bfloat16()
    pe = torch.zeros(1, 1, 16, 4, 2, 2)

    def why(**kw):
        a = dict(x=x, vec=vec, pe=pe, transformer_options={})
        a.update(kw)
        return fused_blocks.not_now_reason(blk, "single", a["x"], a["vec"], a["pe"], a["transformer_options"])
    with active_backend("dequant"):
        assert why() == "single_blocks.0.linear1 runs 'dequant'"
    with active_backend("fp8"):
        assert why() == "single_blocks.0.linear1 has no prepared fp8 weights"
        fp8 = registry.get("fp8")
        for m in fused_blocks.linears(blk, "single"):
            m.set_prepared("fp8", fp8.prepare(m))  # the torch conversion on the CPU
        assert why() == "activations are torch.bfloat16 on cpu (fused blocks: bf16/fp16 on CUDA)"
        assert why(vec=torch.zeros(2, dm.hidden_size)) == "per-token modulation (reference latents with timestep zero)"
        assert why(pe=None) == "no rotary embedding"
        assert why(transformer_options={"patches": {"attn1_patch": [lambda *a, **k: {}]}}) == \
            "attention patches are set on the model"
