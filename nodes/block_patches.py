"""Install the fused FLUX.1 / FLUX.2 blocks (kernels/fused_blocks.py) as ComfyUI "dit" block
replacements.

ComfyUI's Flux forward calls `patches_replace["dit"][("double_block", i)]` (and "single_block")
instead of block i when the model options hold one, passing the block's original forward along.
Each patch here runs the fused forward when the call allows it and ComfyUI's own block otherwise;
the layers' recorded paths ("fp8-fused" or not) tell the user which ran, and the first reason a
block fell back is logged.
"""
from __future__ import annotations

import logging

from ..kernels import fused_blocks

log = logging.getLogger("comfyui_nvfp4")
_LOGGED: set[str] = set()


def _fallback(kind: str, index: int, why: str):
    key = f"{kind}:{why}"
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("NVFP4: %s block %d (and any other with the same reason) runs ComfyUI's own block: %s",
                 kind, index, why)


def make_patch(block, kind: str, index: int):
    """The dit replacement of block `index` ("double" or "single")."""
    def patch(args, extra):
        from comfy.ldm.modules.attention import optimized_attention
        why = fused_blocks.not_now_reason(block, kind, args["img"], args["vec"], args["pe"],
                                          args.get("transformer_options"))
        if why:
            _fallback(kind, index, why)
            return extra["original_block"](args)
        common = (args["vec"], args["pe"], args.get("attn_mask"), args.get("transformer_options") or {},
                  optimized_attention)
        if kind == "double":
            img, txt = fused_blocks.double_block(block, args["img"], args["txt"], *common)
            return {"img": img, "txt": txt}
        return {"img": fused_blocks.single_block(block, args["img"], *common)}
    patch.nvfp4_fused = True
    return patch


def fusable_blocks(diffusion_model, taken=()) -> tuple[list, dict[str, int]]:
    """([(kind, i, block)] of the model's blocks the fused forward computes, {reason: count} of
    the others). `taken`: the dit keys ("double_block", i) another node already replaces."""
    blocks, skipped = [], {}
    for kind in ("double", "single"):
        for i, block in enumerate(getattr(diffusion_model, f"{kind}_blocks", [])):
            why = ("replaced by another node" if (f"{kind}_block", i) in taken
                   else fused_blocks.unfusable_reason(block, kind))
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            else:
                blocks.append((kind, i, block))
    return blocks, skipped


def taken_keys(patcher) -> set:
    """The dit block keys other nodes replace on a ModelPatcher (ours, from an earlier Backend
    node, do not count: a new one decides anew)."""
    dit = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return {k for k, fn in dit.items() if not getattr(fn, "nvfp4_fused", False)}


def block_patches(diffusion_model, taken=()) -> tuple[dict, dict[str, int]]:
    """({("double_block", i) | ("single_block", i): patch} for the model's FLUX blocks,
    {reason: count} of the blocks left alone). `taken`: keys another node already replaces."""
    blocks, skipped = fusable_blocks(diffusion_model, taken)
    return {(f"{kind}_block", i): make_patch(block, kind, i) for kind, i, block in blocks}, skipped


def install(patcher) -> str:
    """Add the fused-block replacements to a (cloned) ModelPatcher; returns a line for the node's
    text. Blocks the fused forward does not compute, or that another node already replaces, are
    left alone."""
    patches, skipped = block_patches(patcher.model.diffusion_model, taken_keys(patcher))
    for (name, i), patch in patches.items():
        patcher.set_model_patch_replace(patch, "dit", name, i)
    text = f"fused fp8 blocks: {len(patches)}"
    if skipped:
        text += " (not fused: " + "; ".join(f"{n} {why}" for why, n in skipped.items()) + ")"
    return text


def remove(patcher) -> None:
    """Drop the replacements this module installed (a second backend node downstream decides
    anew); other nodes' replacements stay. Copies the dicts it changes: clones share them."""
    to = patcher.model_options.get("transformer_options", {})
    dit = to.get("patches_replace", {}).get("dit")
    if not dit:
        return
    keep = {k: fn for k, fn in dit.items() if not getattr(fn, "nvfp4_fused", False)}
    if len(keep) != len(dit):
        to = dict(to)
        to["patches_replace"] = {**to["patches_replace"], "dit": keep}
        patcher.model_options["transformer_options"] = to
