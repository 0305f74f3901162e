"""The (N, K) of every FLUX linear, from a handful of model dimensions.

Used to build synthetic checkpoints and to check a real one's shapes against the model
ComfyUI will build from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import names

HEAD_DIM = 128


@dataclass(frozen=True)
class FluxDims:
    architecture: str
    hidden: int = 128
    depth: int = 1
    depth_single: int = 1
    img_in: int = 64          # patch^2 * in_channels: FLUX.1 2*2*16, FLUX.2 1*1*128
    context: int = 64         # text encoder width (4096 for T5-XXL, 15360 for FLUX.2-dev)
    vector: int | None = 32   # pooled CLIP width (FLUX.1 only)
    guidance: bool = True
    out: int = 64             # patch^2 * out_channels

    @classmethod
    def tiny(cls, architecture: str, **kw) -> "FluxDims":
        if architecture == names.FLUX2:
            base = dict(img_in=128, out=128, vector=None)
            base.update(kw)
            return cls(names.FLUX2, **base)
        return cls(names.FLUX1, **kw)

    @classmethod
    def of_checkpoint(cls, ck) -> "FluxDims":
        s = {n: i.shape for n, i in ck.layers.items()}
        nm = ck.names
        return cls(ck.architecture, hidden=s["img_in"][0],
                   depth=names.count_blocks([n + "." for n in s], "double_blocks."),
                   depth_single=names.count_blocks([n + "." for n in s], "single_blocks."),
                   img_in=s["img_in"][1], context=s["txt_in"][1],
                   vector=s["vector_in.in_layer"][1] if "vector_in.in_layer" in s else None,
                   guidance="guidance_in.in_layer" in nm.linears, out=s["final_layer.linear"][0])


def linear_shapes(d: FluxDims) -> dict[str, tuple[int, int]]:
    h = d.hidden
    flux1 = d.architecture == names.FLUX1
    mlp = 4 * h if flux1 else 3 * h
    mlp_in = mlp if flux1 else 2 * mlp  # FLUX.2's SwiGLU doubles the first projection
    s = {"img_in": (h, d.img_in), "txt_in": (h, d.context), "time_in.in_layer": (h, 256),
         "time_in.out_layer": (h, h), "final_layer.linear": (d.out, h),
         "final_layer.adaLN_modulation.1": (2 * h, h)}
    if d.guidance:
        s.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    if d.vector:
        s.update({"vector_in.in_layer": (h, d.vector), "vector_in.out_layer": (h, h)})
    if not flux1:
        s.update({"double_stream_modulation_img.lin": (6 * h, h), "double_stream_modulation_txt.lin": (6 * h, h),
                  "single_stream_modulation.lin": (3 * h, h)})
    for i in range(d.depth):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}_"
            s.update({b + "attn.qkv": (3 * h, h), b + "attn.proj": (h, h),
                      b + "mlp.0": (mlp_in, h), b + "mlp.2": (h, mlp)})
            if flux1:
                s[b + "mod.lin"] = (6 * h, h)
    for i in range(d.depth_single):
        b = f"single_blocks.{i}."
        s.update({b + "linear1": (3 * h + mlp_in, h), b + "linear2": (h, h + mlp)})
        if flux1:
            s[b + "modulation.lin"] = (3 * h, h)
    return s


def param_shapes(d: FluxDims) -> dict[str, tuple[int, ...]]:
    """Non-linear parameters in BFL naming (the QK-norm scales)."""
    p = {}
    for i in range(d.depth):
        for side in ("img", "txt"):
            for q in ("query", "key"):
                p[f"double_blocks.{i}.{side}_attn.norm.{q}_norm.scale"] = (HEAD_DIM,)
    for i in range(d.depth_single):
        for q in ("query", "key"):
            p[f"single_blocks.{i}.norm.{q}_norm.scale"] = (HEAD_DIM,)
    return p
