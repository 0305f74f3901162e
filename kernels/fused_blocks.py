"""FLUX.1 double- and single-stream blocks on the fp8 backend, with fused elementwise kernels.

ComfyUI's blocks spend as much GPU time around their linear layers (LayerNorm, modulation, QK
RMSNorm, RoPE, torch.cat, GELU, copies) as in them once the GEMMs run in FP8 (BENCHMARKS.md
section 3). These forwards compute the same block with the kernels of triton_fused.py: every
activation a GEMM reads is produced, already quantized to FP8 per token, by the pass that computes
it, and q/k/v are written straight into the tensors attention reads.

They mirror ComfyUI v0.30's `comfy.ldm.flux.layers.DoubleStreamBlock` / `SingleStreamBlock`
forward for FLUX.1 (GELU MLPs, per-block modulation) and run only where `unfusable_reason` and
`not_now_reason` find nothing; otherwise the caller runs ComfyUI's own block (nodes/block_patches.py
reports which). No ComfyUI import: attention comes in as a function
(`comfy.ldm.modules.attention.optimized_attention`).
"""
from __future__ import annotations

import torch

from . import registry
from .module import NVFP4LinearModule

BACKEND = "fp8"
DTYPES = (torch.bfloat16, torch.float16)


def linears(block, kind: str) -> list:
    if kind == "double":
        return [block.img_attn.qkv, block.img_attn.proj, block.img_mlp[0], block.img_mlp[2],
                block.txt_attn.qkv, block.txt_attn.proj, block.txt_mlp[0], block.txt_mlp[2]]
    return [block.linear1, block.linear2]


def qk_norms(block, kind: str) -> list:
    """The QKNorm modules (query_norm, key_norm) of the block's attention."""
    return [block.img_attn.norm, block.txt_attn.norm] if kind == "double" else [block.norm]


def _gelu_mlp(mlp) -> bool:
    return (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], torch.nn.GELU)
            and mlp[1].approximate == "tanh")


def _layer_norm(n) -> bool:
    return isinstance(n, torch.nn.LayerNorm) and not n.elementwise_affine


def unfusable_reason(block, kind: str) -> str | None:
    """Why this block's structure is not the FLUX.1 block the fused forward computes (None: it is)."""
    try:
        if kind == "double":
            if not getattr(block, "modulation", False):
                return "global modulation (FLUX.2-style block)"
            for s in ("img", "txt"):
                if not _gelu_mlp(getattr(block, f"{s}_mlp")):
                    return f"{s}_mlp is not Linear-GELU(tanh)-Linear"
                if not (_layer_norm(getattr(block, f"{s}_norm1")) and _layer_norm(getattr(block, f"{s}_norm2"))):
                    return f"{s} norms are not affine-free LayerNorms"
        elif kind == "single":
            if getattr(block, "modulation", None) is None:
                return "global modulation (FLUX.2-style block)"
            if getattr(block, "yak_mlp", False) or not (isinstance(block.mlp_act, torch.nn.GELU)
                                                         and block.mlp_act.approximate == "tanh"):
                return "the MLP activation is not GELU(tanh)"
            if block.mlp_hidden_dim_first != block.mlp_hidden_dim or not _layer_norm(block.pre_norm):
                return "not a FLUX.1 single block (gated MLP or affine norm)"
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        for n in qk_norms(block, kind):
            if not (isinstance(n.query_norm, torch.nn.RMSNorm) and isinstance(n.key_norm, torch.nn.RMSNorm)):
                return "QK norms are not RMSNorms"
        for lin in linears(block, kind):
            if not isinstance(lin, NVFP4LinearModule) or lin.format != "nvfp4":
                return f"{getattr(lin, 'layer_name', '') or type(lin).__name__} is not an NVFP4 linear"
    except AttributeError as e:
        return f"unexpected block layout ({e})"
    return None


def not_now_reason(block, kind: str, x: torch.Tensor, vec, pe, transformer_options) -> str | None:
    """Why this call cannot take the fused forward (None: it can): the layers' backend, the
    device/dtype, and ComfyUI features the fused forward does not implement."""
    if not isinstance(vec, torch.Tensor) or vec.shape[0] != x.shape[0]:
        return "per-token modulation (reference latents with timestep zero)"
    if pe is None:
        return "no rotary embedding"
    patches = (transformer_options or {}).get("patches", {})
    if patches.get("attn1_patch") or patches.get("attn1_output_patch"):
        return "attention patches are set on the model"
    for lin in linears(block, kind):
        name = lin.backend_name()
        if name != BACKEND:
            return f"{lin.layer_name} runs '{name}'"
        if BACKEND not in lin.prepared_backends():
            return f"{lin.layer_name} has no prepared fp8 weights"
    for n in qk_norms(block, kind):
        for rms in (n.query_norm, n.key_norm):
            if getattr(rms, "weight_function", None) or getattr(rms, "bias_function", None):
                return "QK norm weights are patched"
    if x.device.type != "cuda" or x.dtype not in DTYPES:
        return f"activations are {x.dtype} on {x.device.type} (fused blocks: bf16/fp16 on CUDA)"
    return None


def _rms_weight_eps(rms, x):
    eps = rms.eps if rms.eps is not None else torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    w = rms.weight
    if w is None:
        w = torch.ones(rms.normalized_shape, device=x.device, dtype=x.dtype)
    elif w.device != x.device or w.dtype != x.dtype or not w.is_contiguous():
        w = w.to(x.device, x.dtype).contiguous()
    return w, float(eps)


def _qkv_to_heads(qkv_rows, norm, heads, pe, q, k, v, tok_off):
    from .triton_fused import qk_norm_rope
    qw, eq = _rms_weight_eps(norm.query_norm, qkv_rows)
    kw, ek = _rms_weight_eps(norm.key_norm, qkv_rows)
    qk_norm_rope(qkv_rows, heads, qw, kw, eq, ek, pe, q, k, v, tok_off)


def _heads(bsz, heads, length, dim, x):
    return [torch.empty((bsz, heads, length, dim), device=x.device, dtype=x.dtype) for _ in range(3)]


def double_block(block, img, txt, vec, pe, attn_mask, transformer_options, attention):
    """ComfyUI DoubleStreamBlock.forward (FLUX.1) with fused kernels; img and txt are updated in
    place like ComfyUI's block does. Returns (img, txt)."""
    from .triton_fp8 import act_quant_fp8
    from .triton_fused import gelu_quant, ln_mod_quant
    fp8 = registry.get(BACKEND)
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    bsz, l_img, c = img.shape
    l_txt = txt.shape[1]
    heads = block.num_heads
    q, k, v = _heads(bsz, heads, l_txt + l_img, c // heads, img)
    streams = [(txt, txt_mod1, txt_mod2, block.txt_norm1, block.txt_norm2, block.txt_attn, block.txt_mlp, 0),
               (img, img_mod1, img_mod2, block.img_norm1, block.img_norm2, block.img_attn, block.img_mlp, l_txt)]
    for x, mod1, _, norm1, _, attn_layers, _, off in streams:
        xq, xs = ln_mod_quant(x, mod1.shift, mod1.scale, norm1.eps)
        qkv = fp8.run_quantized(attn_layers.qkv, xq, xs, x.dtype).view(bsz, x.shape[1], -1)
        _qkv_to_heads(qkv, attn_layers.norm, heads, pe, q, k, v, off)
        del xq, xs, qkv
    attn = attention(q, k, v, heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    for x, mod1, mod2, _, norm2, attn_layers, mlp, off in streams:
        length = x.shape[1]
        aq, as_ = act_quant_fp8(attn[:, off:off + length].reshape(bsz * length, c))
        x.addcmul_(fp8.run_quantized(attn_layers.proj, aq, as_, x.dtype).view(bsz, length, c), mod1.gate)
        del aq, as_
        hq, hs = ln_mod_quant(x, mod2.shift, mod2.scale, norm2.eps)
        h = fp8.run_quantized(mlp[0], hq, hs, x.dtype)
        del hq, hs
        gq, gs = gelu_quant(h)
        del h
        x.addcmul_(fp8.run_quantized(mlp[2], gq, gs, x.dtype).view(bsz, length, c), mod2.gate)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_block(block, x, vec, pe, attn_mask, transformer_options, attention):
    """ComfyUI SingleStreamBlock.forward (FLUX.1) with fused kernels; x is updated in place."""
    from .triton_fused import gelu_quant, ln_mod_quant
    fp8 = registry.get(BACKEND)
    mod, _ = block.modulation(vec)
    bsz, length, c = x.shape
    heads = block.num_heads
    xq, xs = ln_mod_quant(x, mod.shift, mod.scale, block.pre_norm.eps)
    out1 = fp8.run_quantized(block.linear1, xq, xs, x.dtype).view(bsz, length, -1)
    del xq, xs
    q, k, v = _heads(bsz, heads, length, c // heads, x)
    _qkv_to_heads(out1[..., :3 * c], block.norm, heads, pe, q, k, v, 0)
    attn = attention(q, k, v, heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    gq, gs = gelu_quant(out1[..., 3 * c:], prefix=attn)
    del out1, attn
    x.addcmul_(fp8.run_quantized(block.linear2, gq, gs, x.dtype).view(bsz, length, c), mod.gate)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
