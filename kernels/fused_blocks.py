"""FLUX.1 and FLUX.2 double- and single-stream blocks on the fp8 backend, with fused elementwise
kernels.

ComfyUI's blocks spend as much GPU time around their linear layers (LayerNorm, modulation, QK
RMSNorm, RoPE, torch.cat, the MLP activation, copies) as in them once the GEMMs run in FP8
(BENCHMARKS.md section 3). These forwards compute the same block with the kernels of
triton_fused.py: every activation a GEMM reads is produced, already quantized to FP8 per token,
by the pass that computes it, and q/k/v are written straight into the tensors attention reads.

They mirror ComfyUI v0.30's `comfy.ldm.flux.layers.DoubleStreamBlock` / `SingleStreamBlock`
forward in its two FLUX configurations: FLUX.1 (per-block modulation, Linear-GELU(tanh)-Linear
MLPs, biases) and FLUX.2 (`global_modulation`: the model computes the modulation once and passes
it in as `vec`; `mlp_silu_act`: gated SiLU MLPs; no biases). They run only where
`unfusable_reason` and `not_now_reason` find nothing; otherwise the caller runs ComfyUI's own block
(nodes/block_patches.py reports which). No ComfyUI import: attention comes in as a function
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


GELU, SWIGLU = "gelu", "swiglu"  # the MLP activations the fused forward computes


def _activation(act) -> str | None:
    """GELU for nn.GELU(tanh) (FLUX.1); SWIGLU for ComfyUI's SiLUActivation (FLUX.2: silu of the
    first half of its input times the second half); None for anything else."""
    if isinstance(act, torch.nn.GELU) and act.approximate == "tanh":
        return GELU
    if type(act).__name__ == "SiLUActivation" and isinstance(getattr(act, "gate_fn", None), torch.nn.SiLU):
        return SWIGLU
    return None


def _mlp_activation(mlp) -> str | None:
    """The activation of a Linear-activation-Linear MLP whose widths match it, else None."""
    if not (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3):
        return None
    act = _activation(mlp[1])
    hidden = getattr(mlp[2], "in_features", None)
    width = getattr(mlp[0], "out_features", None)
    return act if width == (2 * hidden if act == SWIGLU else hidden) else None


def _single_activation(block) -> str | None:
    act = _activation(getattr(block, "mlp_act", None))
    if getattr(block, "yak_mlp", False) or act is None:
        return None
    return act if block.mlp_hidden_dim_first == (2 if act == SWIGLU else 1) * block.mlp_hidden_dim else None


def _act_quant(act: str, h, prefix=None):
    from .triton_fused import gelu_quant, swiglu_quant
    return (swiglu_quant if act == SWIGLU else gelu_quant)(h, prefix=prefix)


def _layer_norm(n) -> bool:
    return isinstance(n, torch.nn.LayerNorm) and not n.elementwise_affine


def unfusable_reason(block, kind: str) -> str | None:
    """Why this block's structure is not a FLUX.1 or FLUX.2 block the fused forward computes (None:
    it is)."""
    try:
        if kind == "double":
            for s in ("img", "txt"):
                if _mlp_activation(getattr(block, f"{s}_mlp")) is None:
                    return f"{s}_mlp is neither Linear-GELU(tanh)-Linear nor Linear-SiLU gate-Linear"
                if not (_layer_norm(getattr(block, f"{s}_norm1")) and _layer_norm(getattr(block, f"{s}_norm2"))):
                    return f"{s} norms are not affine-free LayerNorms"
        elif kind == "single":
            if _single_activation(block) is None:
                return "the MLP is neither GELU(tanh) nor a SiLU gate of matching width"
            if not _layer_norm(block.pre_norm):
                return "the pre-norm is not an affine-free LayerNorm"
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
    why = _modulation_reason(block, kind, x, vec)
    if why:
        return why
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


def _own_modulation(block, kind: str) -> bool:
    """FLUX.1 blocks hold their modulation layers; FLUX.2's model passes the modulation in."""
    own = getattr(block, "modulation", None)
    return bool(own) if kind == "double" else own is not None


def modulations(block, kind: str, vec) -> tuple:
    """The block's ModulationOuts: (img_mod1, img_mod2, txt_mod1, txt_mod2) for a double block,
    (mod,) for a single one; FLUX.1 blocks compute theirs from vec here (their modulation GEMMs)."""
    if kind == "double":
        if _own_modulation(block, kind):
            return (*block.img_mod(vec), *block.txt_mod(vec))
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        return img_mod1, img_mod2, txt_mod1, txt_mod2
    return (block.modulation(vec)[0],) if _own_modulation(block, kind) else (vec,)


def _modulation_reason(block, kind: str, x, vec) -> str | None:
    """Why `vec` is not one modulation per sample the fused forward can apply (None: it is).
    ComfyUI splits the modulation per token range when reference latents run at timestep zero:
    FLUX.1 blocks then get a vec of twice the batch, FLUX.2 blocks modulations of [B, 2, C]."""
    per_token = "per-token modulation (reference latents with timestep zero)"
    if _own_modulation(block, kind):
        if not isinstance(vec, torch.Tensor):
            return f"unexpected modulation input ({type(vec).__name__}, not a tensor)"
        return per_token if vec.shape[0] != x.shape[0] else None
    try:
        mods = modulations(block, kind, vec)
        shapes = {tuple(t.shape) for mod in mods for t in (mod.shift, mod.scale, mod.gate)}
    except (TypeError, ValueError, AttributeError) as e:
        return f"unexpected modulation input ({type(e).__name__}: {e})"
    if shapes != {(x.shape[0], 1, x.shape[2])}:
        return per_token if any(len(sh) == 3 and sh[1] > 1 for sh in shapes) else \
            f"unexpected modulation shapes {sorted(shapes)} for tokens {tuple(x.shape)}"
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
    """ComfyUI DoubleStreamBlock.forward (FLUX.1 or FLUX.2) with fused kernels; img and txt are
    updated in place like ComfyUI's block does. Returns (img, txt)."""
    from .triton_fp8 import act_quant_fp8
    from .triton_fused import ln_mod_quant
    fp8 = registry.get(BACKEND)
    img_mod1, img_mod2, txt_mod1, txt_mod2 = modulations(block, "double", vec)
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
        gq, gs = _act_quant(_mlp_activation(mlp), h)
        del h
        x.addcmul_(fp8.run_quantized(mlp[2], gq, gs, x.dtype).view(bsz, length, c), mod2.gate)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_block(block, x, vec, pe, attn_mask, transformer_options, attention):
    """ComfyUI SingleStreamBlock.forward (FLUX.1 or FLUX.2) with fused kernels; x is updated in
    place."""
    from .triton_fused import ln_mod_quant
    fp8 = registry.get(BACKEND)
    mod, = modulations(block, "single", vec)
    bsz, length, c = x.shape
    heads = block.num_heads
    xq, xs = ln_mod_quant(x, mod.shift, mod.scale, block.pre_norm.eps)
    out1 = fp8.run_quantized(block.linear1, xq, xs, x.dtype).view(bsz, length, -1)
    del xq, xs
    q, k, v = _heads(bsz, heads, length, c // heads, x)
    _qkv_to_heads(out1[..., :3 * c], block.norm, heads, pe, q, k, v, 0)
    attn = attention(q, k, v, heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
    del q, k, v
    gq, gs = _act_quant(_single_activation(block), out1[..., 3 * c:], prefix=attn)
    del out1, attn
    x.addcmul_(fp8.run_quantized(block.linear2, gq, gs, x.dtype).view(bsz, length, c), mod.gate)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
