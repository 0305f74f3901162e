"""FLUX.1 / FLUX.2 layer names: ComfyUI (BFL) module names and their diffusers sources.

The canonical name of every layer is ComfyUI's module path (`double_blocks.0.img_attn.qkv`).
A diffusers checkpoint stores some of those as several modules (q, k, v, proj_mlp) whose
rows are concatenated in the order given here.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

FLUX1, FLUX2 = "flux1", "flux2"
DIFFUSERS, BFL = "diffusers", "bfl"

# Prefixes that single-file checkpoints sometimes put in front of the DiT keys.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class LinearSpec:
    """One ComfyUI linear and the diffusers modules it is made of (rows in this order).

    `row_share` gives each source's share of the output rows in units of the hidden size;
    None means "whatever rows are left" (FLUX.1 proj_mlp).
    """
    name: str
    sources: tuple[str, ...]
    row_share: tuple[int | None, ...] = (None,)
    swap_halves: bool = False  # diffusers stores (scale, shift), BFL (shift, scale)

    def source_sizes(self, n: int, hidden: int) -> list[int]:
        """Output rows of each source module for a fused layer of n rows."""
        fixed = sum(s * hidden for s in self.row_share if s is not None)
        return [s * hidden if s is not None else n - fixed for s in self.row_share]

    def scale_groups(self, n: int, hidden: int) -> list[int]:
        """Row counts of the groups ModelOpt gives one weight_scale_2 each: the attention
        projections (q, k, v) are unified, any other source (proj_mlp) keeps its own."""
        groups, attn = [], 0
        for share, size in zip(self.row_share, self.source_sizes(n, hidden)):
            if share is not None:
                attn += size
            else:
                groups.append(size)
        return ([attn] if attn else []) + groups


@dataclass
class NameMap:
    architecture: str
    linears: dict[str, LinearSpec] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # BFL key -> diffusers key


def _double_block(arch: str, i: int) -> tuple[list[LinearSpec], dict[str, str]]:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    qkv = (1, 1, 1)
    specs = [
        LinearSpec(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), qkv),
        LinearSpec(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), qkv),
        LinearSpec(b + "img_attn.proj", (d + "attn.to_out.0",)),
        LinearSpec(b + "txt_attn.proj", (d + "attn.to_add_out",)),
    ]
    if arch == FLUX1:
        specs += [
            LinearSpec(b + "img_mod.lin", (d + "norm1.linear",)),
            LinearSpec(b + "txt_mod.lin", (d + "norm1_context.linear",)),
            LinearSpec(b + "img_mlp.0", (d + "ff.net.0.proj",)),
            LinearSpec(b + "img_mlp.2", (d + "ff.net.2",)),
            LinearSpec(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
            LinearSpec(b + "txt_mlp.2", (d + "ff_context.net.2",)),
        ]
    else:
        specs += [
            LinearSpec(b + "img_mlp.0", (d + "ff.linear_in",)),
            LinearSpec(b + "img_mlp.2", (d + "ff.linear_out",)),
            LinearSpec(b + "txt_mlp.0", (d + "ff_context.linear_in",)),
            LinearSpec(b + "txt_mlp.2", (d + "ff_context.linear_out",)),
        ]
    params = {
        b + "img_attn.norm.query_norm.scale": d + "attn.norm_q.weight",
        b + "img_attn.norm.key_norm.scale": d + "attn.norm_k.weight",
        b + "txt_attn.norm.query_norm.scale": d + "attn.norm_added_q.weight",
        b + "txt_attn.norm.key_norm.scale": d + "attn.norm_added_k.weight",
    }
    return specs, params


def _single_block(arch: str, i: int) -> tuple[list[LinearSpec], dict[str, str]]:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    if arch == FLUX1:
        specs = [
            LinearSpec(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"),
                       (1, 1, 1, None)),
            LinearSpec(b + "linear2", (d + "proj_out",)),
            LinearSpec(b + "modulation.lin", (d + "norm.linear",)),
        ]
    else:
        specs = [
            LinearSpec(b + "linear1", (d + "attn.to_qkv_mlp_proj",)),
            LinearSpec(b + "linear2", (d + "attn.to_out",)),
        ]
    params = {
        b + "norm.query_norm.scale": d + "attn.norm_q.weight",
        b + "norm.key_norm.scale": d + "attn.norm_k.weight",
    }
    return specs, params


def _top_level(arch: str, has_guidance: bool, has_vector: bool) -> list[LinearSpec]:
    emb = "time_text_embed" if arch == FLUX1 else "time_guidance_embed"
    specs = [
        LinearSpec("img_in", ("x_embedder",)),
        LinearSpec("txt_in", ("context_embedder",)),
        LinearSpec("time_in.in_layer", (f"{emb}.timestep_embedder.linear_1",)),
        LinearSpec("time_in.out_layer", (f"{emb}.timestep_embedder.linear_2",)),
        LinearSpec("final_layer.linear", ("proj_out",)),
        LinearSpec("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    if has_guidance:
        specs += [LinearSpec("guidance_in.in_layer", (f"{emb}.guidance_embedder.linear_1",)),
                  LinearSpec("guidance_in.out_layer", (f"{emb}.guidance_embedder.linear_2",))]
    if has_vector:
        specs += [LinearSpec("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
                  LinearSpec("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",))]
    if arch == FLUX2:
        specs += [LinearSpec(f"{m}.lin", (f"{m}.linear",)) for m in
                  ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")]
    return specs


def build_name_map(arch: str, depth: int, depth_single: int, has_guidance: bool,
                   has_vector: bool) -> NameMap:
    nm = NameMap(arch)
    specs = _top_level(arch, has_guidance, has_vector)
    for i in range(depth):
        s, p = _double_block(arch, i)
        specs += s
        nm.params.update(p)
    for i in range(depth_single):
        s, p = _single_block(arch, i)
        specs += s
        nm.params.update(p)
    nm.linears = {s.name: s for s in specs}
    return nm


# --- detection from key names (the names say which model; the config says which layout) ---

def strip_prefix(keys) -> str:
    for p in KNOWN_PREFIXES:
        if any(k.startswith(p + "img_in.") or k.startswith(p + "double_blocks.") for k in keys):
            return p
    return ""


def detect_naming(keys: set[str]) -> str | None:
    if any(k.startswith(("transformer_blocks.", "x_embedder.", "single_transformer_blocks.")) for k in keys):
        return DIFFUSERS
    if any(k.startswith(("double_blocks.", "img_in.", "single_blocks.")) for k in keys):
        return BFL
    return None


def detect_architecture(keys: set[str], naming: str) -> str | None:
    if naming == BFL:
        if "double_stream_modulation_img.lin.weight" in keys:
            return FLUX2
        if any(k.startswith("double_blocks.0.img_attn.norm.key_norm.") for k in keys) and "img_in.weight" in keys:
            return FLUX1
    elif naming == DIFFUSERS:
        if "double_stream_modulation_img.linear.weight" in keys:
            return FLUX2
        if "transformer_blocks.0.attn.norm_k.weight" in keys and "x_embedder.weight" in keys:
            return FLUX1
    return None


def count_blocks(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def name_map_for_keys(keys: set[str], naming: str, arch: str) -> NameMap:
    if naming == BFL:
        depth = count_blocks(keys, "double_blocks.")
        single = count_blocks(keys, "single_blocks.")
        guidance = "guidance_in.in_layer.weight" in keys
        vector = "vector_in.in_layer.weight" in keys
    else:
        depth = count_blocks(keys, "transformer_blocks.")
        single = count_blocks(keys, "single_transformer_blocks.")
        guidance = any(".guidance_embedder.linear_1.weight" in k for k in keys)
        vector = "time_text_embed.text_embedder.linear_1.weight" in keys
    return build_name_map(arch, depth, single, guidance, vector)


# --- which linears run on the conditioning vector rather than on tokens ---

# The layers whose input is the conditioning vector (time, guidance, pooled text): one row per
# image in the batch, whatever the resolution. Every other linear runs on the text and image
# tokens (hundreds to thousands of rows).
VECTOR_FED = (
    "double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin",  # FLUX.1
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",  # FLUX.2
    "final_layer.adaLN_modulation.1", "time_in.*", "guidance_in.*", "vector_in.*",
)


def vector_fed(name: str) -> bool:
    """Whether the ComfyUI linear `name` runs on the conditioning vector (M = the batch size)."""
    return any(fnmatch.fnmatchcase(name, p) for p in VECTOR_FED)


# --- ModelOpt's default FLUX exclusions, and user patterns ---

DEFAULT_EXCLUDE = (
    "img_in", "txt_in", "time_in.*", "guidance_in.*", "vector_in.*",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)


def is_excluded(name: str, spec: LinearSpec | None, patterns) -> bool:
    """Glob patterns match either the ComfyUI name or any of the diffusers source names."""
    candidates = [name] + (list(spec.sources) if spec else [])
    return any(fnmatch.fnmatchcase(c, p) for p in patterns for c in candidates)
