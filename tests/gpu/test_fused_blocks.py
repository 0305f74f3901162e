"""Fused FLUX.1 and FLUX.2 blocks (fp8) on a real GPU: the kernels with real bf16/fp8 rounding, then whole
blocks and a small Flux model against ComfyUI's own (COMFYUI_PATH: a ComfyUI checkout; the
block tests skip without it)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from comfyui_nvfp4.kernels import fused_blocks, registry, triton_fused
from comfyui_nvfp4.kernels.module import NVFP4LinearModule, active_backend
from comfyui_nvfp4.kernels.triton_fp8 import act_quant_fp8
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import DenseLinear, NVFP4Linear

DEV = torch.device("cuda")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def fp8_codes_match(q, s, ref_bf16):
    """q/s is the per-token FP8 of ref (ComfyUI's bf16 ops), as accurate as act_quant_fp8 of ref.
    The fused kernels quantize fp32 values, not ref's bf16 copy: a code sitting near an e4m3
    rounding midpoint may land one step away from act_quant_fp8's."""
    ref = ref_bf16.reshape(q.shape).float()
    rq, rs = act_quant_fp8(ref_bf16.reshape(q.shape))
    torch.testing.assert_close(s, rs, rtol=1e-2, atol=0)
    assert (q.float() != rq.float()).float().mean() < 0.1  # codes one step apart, a few %
    assert rel(q.float() * s, ref) < 1.02 * rel(rq.float() * rs, ref) + 1e-4


@pytest.mark.parametrize("bsz,length,k", [(1, 4608, 3072), (2, 37, 1000)])
def test_ln_mod_quant_matches_layernorm_addcmul_act_quant(bsz, length, k):
    x = torch.randn(bsz, length, k, device=DEV, dtype=torch.bfloat16) * 3 + 0.5
    mod = torch.randn(bsz, 1, 6 * k, device=DEV, dtype=torch.bfloat16) * 0.3
    shift, scale = mod[..., :k], mod[..., k:2 * k]
    q, s = triton_fused.ln_mod_quant(x, shift, scale, 1e-6)
    ref = torch.addcmul(shift, F.layer_norm(x, (k,), eps=1e-6), 1 + scale)  # ComfyUI's bf16 ops
    fp8_codes_match(q, s, ref)


@pytest.mark.parametrize("prefix", [0, 3072])
def test_gelu_quant_matches_cat_gelu_act_quant(prefix):
    out1 = torch.randn(2, 300, 9216 + 12288, device=DEV, dtype=torch.bfloat16) * 2
    h = out1[..., 9216:]
    a = torch.randn(2, 300, prefix, device=DEV, dtype=torch.bfloat16) if prefix else None
    q, s = triton_fused.gelu_quant(h, prefix=a)
    g = F.gelu(h, approximate="tanh")
    fp8_codes_match(q, s, torch.cat([a, g], -1) if prefix else g)


@pytest.mark.parametrize("prefix,rows", [(0, 300), (6144, 300), (768, 2 * 132 * 4 + 37)])
def test_swiglu_quant_matches_chunk_silu_mul_act_quant(prefix, rows):
    # FLUX.2-dev's widths (6144 hidden, 2 x 18432 gate and value), and a small one with more rows
    # than the kernel's programs, each looping over several
    kh = 18432 if prefix != 768 else 1000
    out1 = torch.randn(1, rows, 3 * 6144 + 2 * kh, device=DEV, dtype=torch.bfloat16) * 2
    h = out1[..., 3 * 6144:]
    a = torch.randn(1, rows, prefix, device=DEV, dtype=torch.bfloat16) if prefix else None
    q, s = triton_fused.swiglu_quant(h, prefix=a)
    h1, h2 = h.chunk(2, dim=-1)
    g = F.silu(h1) * h2  # ComfyUI's SiLUActivation
    fp8_codes_match(q, s, torch.cat([a, g], -1) if prefix else g)


def test_qk_norm_rope_matches_rms_norm_and_rope_within_a_bf16_step():
    bsz, heads, d, l_txt, length = 2, 24, 128, 16, 300
    qkv = torch.randn(bsz, length, 3 * heads * d + 64, device=DEV, dtype=torch.bfloat16)[..., :3 * heads * d]
    pos = torch.randn(1, l_txt + length, d // 2, device=DEV) * 50
    pe = torch.stack([pos.cos(), -pos.sin(), pos.sin(), pos.cos()], -1).reshape(1, 1, l_txt + length, d // 2, 2, 2)
    qw = torch.randn(d, device=DEV, dtype=torch.bfloat16)
    kw = torch.randn(d, device=DEV, dtype=torch.bfloat16)
    q, k, v = [torch.full((bsz, heads, l_txt + length, d), float("nan"), device=DEV, dtype=torch.bfloat16)
               for _ in range(3)]
    eps_k = torch.finfo(torch.bfloat16).eps
    triton_fused.qk_norm_rope(qkv, heads, qw, kw, 1e-6, eps_k, pe, q, k, v, l_txt)
    rq, rk, rv = qkv.view(bsz, length, 3, heads, d).permute(2, 0, 3, 1, 4)

    def rope(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        f = pe[:, :, l_txt:]
        return (f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]).reshape(*x.shape).bfloat16()
    for got, want in ((q, rope(F.rms_norm(rq, (d,), qw, 1e-6))), (k, rope(F.rms_norm(rk, (d,), kw, eps_k)))):
        got = got[:, :, l_txt:].float()
        # one bf16 rounding of the normed value may differ (sum order): a step of the largest input
        assert (got - want.float()).abs().max() <= 2 * 2.0 ** -8 * want.float().abs().max()
        assert rel(got, want) < 2e-3
    assert torch.equal(v[:, :, l_txt:], rv)
    assert q[:, :, :l_txt].isnan().all() and k[:, :, :l_txt].isnan().all() and v[:, :, :l_txt].isnan().all()


# ---- whole blocks against ComfyUI's ----

def comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: the block tests compare with ComfyUI's own FLUX blocks")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.model
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention
    return comfy.ldm.flux, comfy.ops, optimized_attention


def random_ops(comfy_ops, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)

    class Linear(NVFP4LinearModule):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__(in_features, out_features, bias)
            w = torch.randn(out_features, in_features, device=DEV, generator=g) / math.sqrt(in_features)
            b = (torch.randn(out_features, device=DEV, generator=g) * 0.05).bfloat16() if bias else None
            self.set_layer(NVFP4Linear([nvfp4.quantize(w)], b))

    class Ops(comfy_ops.manual_cast):
        pass
    Ops.Linear = Linear
    return Ops


def init_norms(model, seed=3):
    """ComfyUI's RMSNorm leaves its weight uninitialized (checkpoints fill it): random here,
    away from 1 so that a kernel ignoring the weight fails."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for n in model.modules():
        if isinstance(n, torch.nn.RMSNorm):
            n.weight.data = (torch.rand(n.weight.shape, device=DEV, generator=g) + 0.5).to(n.weight.dtype)


def prepare_fp8(model):
    fp8 = registry.get("fp8")
    for n, m in model.named_modules():
        if isinstance(m, NVFP4LinearModule):
            m.layer_name = n
            m.set_prepared("fp8", fp8.prepare(m))


def dense_twin(model):
    """The same model with bf16 dequantized weights (the accuracy reference)."""
    import copy
    d = copy.deepcopy(model)
    for m in d.modules():
        if isinstance(m, NVFP4LinearModule):
            m.drop_prepared()
            m.set_layer(DenseLinear(m.canonical().dequantize(torch.bfloat16), m._parameters.get("bias")))
    return d


FLUX1, FLUX2 = "flux1", "flux2"


def block_inputs(flux, hidden, heads, l_txt, l_img, bsz=1, arch=FLUX1):
    g = torch.Generator(device=DEV).manual_seed(5)
    axes = [16, 56, 56] if arch == FLUX1 else [32, 32, 32, 32]
    emb = flux.layers.EmbedND(dim=hidden // heads, theta=10000 if arch == FLUX1 else 2000, axes_dim=axes)
    ids = torch.zeros(bsz, l_txt + l_img, len(axes), device=DEV)
    side = int(math.isqrt(l_img))
    ids[:, l_txt:, 1] = (torch.arange(l_img, device=DEV) // side).float()
    ids[:, l_txt:, 2] = (torch.arange(l_img, device=DEV) % side).float()
    return dict(img=torch.randn(bsz, l_img, hidden, device=DEV, generator=g).bfloat16(),
                txt=torch.randn(bsz, l_txt, hidden, device=DEV, generator=g).bfloat16(),
                vec=torch.randn(bsz, hidden, device=DEV, generator=g).bfloat16(),
                pe=emb(ids))


def flux_blocks(flux, ops, hidden, heads, dtype, arch):
    """A double and a single block as ComfyUI's Flux builds them for FLUX.1 or FLUX.2, and the
    `vec` each takes: FLUX.2's model computes the modulation once (global modulation layers,
    here NVFP4 too) and passes the blocks its outputs."""
    f2 = dict(modulation=False, mlp_silu_act=True) if arch == FLUX2 else {}
    ratio = 3.0 if arch == FLUX2 else 4.0
    double = flux.layers.DoubleStreamBlock(hidden, heads, ratio, qkv_bias=arch == FLUX1, proj_bias=arch == FLUX1,
                                           dtype=dtype, device=DEV, operations=ops, **f2).to(DEV)
    single = flux.layers.SingleStreamBlock(hidden, heads, ratio, bias=arch == FLUX1, dtype=dtype, device=DEV,
                                           operations=ops, **f2).to(DEV)
    if arch == FLUX1:
        return double, single, lambda vec: (vec, vec)
    mods = [flux.layers.Modulation(hidden, double=d, bias=False, dtype=dtype, device=DEV, operations=ops).to(DEV)
            for d in (True, True, False)]
    for m in mods:
        prepare_fp8(m)
    return double, single, lambda vec: ((mods[0](vec), mods[1](vec)), mods[2](vec)[0])


@pytest.mark.parametrize("bsz,dtype,arch", [(1, torch.bfloat16, FLUX1), (2, torch.bfloat16, FLUX1),
                                            (1, torch.float16, FLUX1), (1, torch.bfloat16, FLUX2),
                                            (2, torch.bfloat16, FLUX2), (1, torch.float16, FLUX2)])
def test_fused_double_and_single_blocks_match_comfyui_blocks(bsz, dtype, arch):
    flux, comfy_ops, attention = comfy()
    hidden, heads = 512, 4
    ops = random_ops(comfy_ops, seed=bsz)
    double, single, block_vecs = flux_blocks(flux, ops, hidden, heads, dtype, arch)
    init_norms(double)
    init_norms(single)
    assert fused_blocks.unfusable_reason(double, "double") is None
    assert fused_blocks.unfusable_reason(single, "single") is None
    prepare_fp8(double)
    prepare_fp8(single)
    dd, ds = dense_twin(double), dense_twin(single)
    a = block_inputs(flux, hidden, heads, l_txt=40, l_img=256, bsz=bsz, arch=arch)
    a = {k: v if k == "pe" else v.to(dtype) for k, v in a.items()}  # rotations stay fp32, as in ComfyUI
    x = torch.cat([a["txt"], a["img"]], 1)
    with torch.inference_mode(), active_backend("fp8"):
        vec_d, vec_s = block_vecs(a["vec"])  # FLUX.2: the same modulation for all three runs
        assert fused_blocks.not_now_reason(double, "double", a["img"], vec_d, a["pe"], {}) is None
        assert fused_blocks.not_now_reason(single, "single", x, vec_s, a["pe"], {}) is None
        ref_img, ref_txt = dd(a["img"].clone(), a["txt"].clone(), vec_d, a["pe"])
        ref_x = ds(x.clone(), vec_s, a["pe"])
        unf_img, unf_txt = double(a["img"].clone(), a["txt"].clone(), vec_d, a["pe"])
        unf_x = single(x.clone(), vec_s, a["pe"])
        assert {m.last_path for m in fused_blocks.linears(double, "double")} == {"fp8"}
        img, txt = fused_blocks.double_block(double, a["img"].clone(), a["txt"].clone(), vec_d, a["pe"],
                                             None, {}, attention)
        fx = fused_blocks.single_block(single, x.clone(), vec_s, a["pe"], None, {}, attention)
    assert {m.last_path for m in fused_blocks.linears(double, "double") + fused_blocks.linears(single, "single")} \
        == {"fp8-fused"}
    # residual streams: compare what the block added (the input itself would hide errors)
    for got, unfused, ref, inp in ((img, unf_img, ref_img, a["img"]), (txt, unf_txt, ref_txt, a["txt"]),
                                   (fx, unf_x, ref_x, x)):
        d_got, d_unf, d_ref = got.float() - inp.float(), unfused.float() - inp.float(), ref.float() - inp.float()
        # fused and unfused quantize the same activations at other rounding points (fp32 vs a
        # bf16 copy), so their FP8 errors differ; each is ~3% from the bf16 block
        print(f"{arch} block delta: fused vs unfused {rel(d_got, d_unf):.4f}, fused vs bf16 {rel(d_got, d_ref):.4f}, "
              f"unfused vs bf16 {rel(d_unf, d_ref):.4f}")
        assert rel(d_got, d_unf) < 0.06
        assert rel(d_got, d_ref) < 1.1 * rel(d_unf, d_ref) + 1e-3  # no less accurate than unfused fp8


def fused_unfused_and_reference(model, inputs, name):
    """A prepared model's output in bf16 (dequantized weights), fp8 and fp8 with every block
    fused: (reference, unfused, fused, the patches), the fused one checked against the others."""
    from comfyui_nvfp4.nodes import block_patches
    patches, skipped = block_patches.block_patches(model)
    assert len(patches) == len(model.double_blocks) + len(model.single_blocks) and not skipped
    dense = dense_twin(model)
    with torch.inference_mode():
        ref = dense(**inputs)
    with torch.inference_mode(), active_backend("fp8"):
        unfused = model(**inputs)
        for m in model.modules():
            if isinstance(m, NVFP4LinearModule):
                m.last_path = None
        fused = model(**inputs, transformer_options={"patches_replace": {"dit": patches}})
    in_blocks = [lin for kind in ("double", "single") for blk in getattr(model, f"{kind}_blocks")
                 for lin in fused_blocks.linears(blk, kind)]
    assert {m.last_path for m in in_blocks} == {"fp8-fused"}
    assert torch.isfinite(fused).all()
    print(f"{name}: fused vs unfused {rel(fused, unfused):.4f}, fused vs bf16 {rel(fused, ref):.4f}, "
          f"unfused vs bf16 {rel(unfused, ref):.4f}")
    assert rel(fused, unfused) < 0.06
    assert rel(fused, ref) < 1.1 * rel(unfused, ref) + 1e-3
    return ref, unfused, fused, patches


def test_flux2_model_with_fused_block_patches_matches_unfused():
    """FLUX.2's configuration of ComfyUI's Flux (global modulation, SiLU-gated MLPs, no biases,
    four RoPE axes, patch 1): every block fused, the model's output as accurate as unfused fp8."""
    flux, comfy_ops, _ = comfy()
    ops = random_ops(comfy_ops, seed=11)
    model = flux.model.Flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                            context_in_dim=96, hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=2,
                            depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                            qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
                            mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                            dtype=torch.bfloat16, device=DEV, operations=ops).to(DEV)
    init_norms(model)
    prepare_fp8(model)
    g = torch.Generator(device=DEV).manual_seed(4)
    inputs = dict(x=torch.randn(1, 128, 16, 16, device=DEV, generator=g).bfloat16(),
                  timestep=torch.tensor([0.7], device=DEV), guidance=torch.tensor([3.5], device=DEV),
                  context=torch.randn(1, 24, 96, device=DEV, generator=g).bfloat16())
    fused_unfused_and_reference(model, inputs, "flux2 model")


def test_flux_model_with_fused_block_patches_matches_unfused():
    flux, comfy_ops, _ = comfy()
    ops = random_ops(comfy_ops, seed=7)
    model = flux.model.Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=96,
                            hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                            axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                            txt_ids_dims=[], dtype=torch.bfloat16, device=DEV, operations=ops).to(DEV)
    init_norms(model)
    prepare_fp8(model)
    g = torch.Generator(device=DEV).manual_seed(2)
    inputs = dict(x=torch.randn(1, 16, 32, 32, device=DEV, generator=g).bfloat16(),
                  timestep=torch.tensor([0.7], device=DEV), guidance=torch.tensor([3.5], device=DEV),
                  context=torch.randn(1, 24, 96, device=DEV, generator=g).bfloat16(),
                  y=torch.randn(1, 64, device=DEV, generator=g).bfloat16())
    ref, unfused, fused, patches = fused_unfused_and_reference(model, inputs, "model")
    # a layer on another backend: the patch runs ComfyUI's block (w4a16 here), nothing fused
    w4 = registry.get("w4a16")
    blk = model.single_blocks[0]
    for m in model.modules():
        if isinstance(m, NVFP4LinearModule):
            m.set_prepared("w4a16", w4.prepare(m))
            m.last_path = None
    with torch.inference_mode(), active_backend("w4a16"):
        model(**inputs, transformer_options={"patches_replace": {"dit": patches}})
    paths = {m.last_path for m in fused_blocks.linears(blk, "single")}
    assert paths and all(p.startswith("w4a16") for p in paths), paths  # w4a16 / w4a16-dq
    # a mix `auto` can pick: the layers fed the conditioning vector (modulation, embedders) on
    # w4a16, the token layers on fp8; the blocks still run fused around the w4a16 modulation
    from comfyui_nvfp4.quant import names
    linear_names = {m: n for n, m in model.named_modules() if isinstance(m, NVFP4LinearModule)}
    for m, n in linear_names.items():
        m.auto_choice = "w4a16" if names.vector_fed(n) else "fp8"
        m.last_path = None
    with torch.inference_mode(), active_backend("auto"):
        mixed = model(**inputs, transformer_options={"patches_replace": {"dit": patches}})
    by_kind = {}
    for m, n in linear_names.items():  # w4a16 runs `dequant` where K is no multiple of 128 (vector_in's 64)
        path = m.last_path if m.in_features % 128 == 0 or m.last_path != "dequant" else "dequant, K % 128"
        by_kind.setdefault(names.vector_fed(n), set()).add(path)
    assert by_kind[True] <= {"w4a16", "dequant, K % 128"} and "w4a16" in by_kind[True], by_kind
    assert "fp8-fused" in by_kind[False], by_kind
    print(f"model, auto's mix: vs fused fp8 {rel(mixed, fused):.4f}, vs bf16 {rel(mixed, ref):.4f}")
    assert torch.isfinite(mixed).all() and rel(mixed, ref) < 1.1 * rel(unfused, ref) + 1e-3
