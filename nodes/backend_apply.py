"""Attach a GEMM backend to a MODEL: select, prepare weights, wrap sampling, report paths."""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.patcher_extension
import comfy.utils

from ..kernels import autotune, env_override, fused_blocks, preparation, registry
from ..kernels.module import NVFP4LinearModule, active_backend
from . import block_patches, path_report

log = logging.getLogger("comfyui_nvfp4")
WRAPPER_KEY = "comfyui_nvfp4.backend"
LAST_SUMMARY: dict[str, dict] = {}  # node id -> last observed path summary (served at /nvfp4/paths)


def nvfp4_modules(patcher) -> list[NVFP4LinearModule]:
    return path_report.linear_modules(patcher.model.diffusion_model)


def compute_dtype(patcher):
    m = patcher.model
    return getattr(m, "manual_cast_dtype", None) or m.get_dtype()


def select(patcher, modules, choice: str, device, fuse_blocks: bool = True):
    """(name active during sampling, module -> Backend, text about the choice) for the model's
    NVFP4 linear `modules`. Raises at selection time, never mid-sampling, when the choice cannot
    run here. Under `auto` each layer gets the winner timed for its shape and kind (token layers,
    vector-fed layers); with `fuse_blocks`, the token layers of blocks that can run fused stay on
    fp8 wherever fp8 can run: the fused block's saving (a third of the step, BENCHMARKS.md section
    3) outweighs any per-GEMM difference, and one layer off fp8 unfuses its block."""
    override = env_override.read(registry.names())
    note = ""
    if override is not None and override != choice:
        note = f" ({env_override.ENV_VAR}={override} overrides the node's '{choice}')"
        log.info("NVFP4:%s", note)
        choice = override
    if choice != registry.AUTO:
        backend = registry.resolve(choice, device)
        getattr(backend, "check_dtype", lambda dtype: None)(compute_dtype(patcher))  # bf16/fp16-only GEMMs
        return backend.name, (lambda m: backend), f"{backend.name}{note}"
    quantized = [m for m in modules if m.format == "nvfp4"]
    keys = {m: autotune.layer_key(m) for m in quantized}  # shape and the rows it meets
    candidates = autotune.auto_candidates(device, compute_dtype(patcher))
    table = autotune.choose(set(keys.values()), device, candidates)
    for m in quantized:
        m.auto_choice = table[keys[m]]["winner"]
    text = f"auto{note}:\n" + autotune.format_table(table)
    if fuse_blocks and any(b.name == fused_blocks.BACKEND for b in candidates):
        blocks, _ = block_patches.fusable_blocks(patcher.model.diffusion_model, block_patches.taken_keys(patcher))
        fused = [lin for kind, _, block in blocks for lin in fused_blocks.linears(block, kind)]
        moved = sum(lin.auto_choice != fused_blocks.BACKEND for lin in fused)
        for lin in fused:
            lin.auto_choice = fused_blocks.BACKEND
        if fused:
            text += (f"\nfused blocks: their {len(fused)} token layers run {fused_blocks.BACKEND}"
                     + (f" ({moved} of them timed faster on another backend alone)" if moved else ""))
    return registry.AUTO, (lambda m: registry.get(m.auto_choice)), text


def prepare(patcher, modules, backend_for, device) -> dict:
    """Make the chosen layouts of `modules` (once per backend per model) and free the others.
    Layouts are made from the CPU originals, so a model still loaded on the GPU is unloaded first."""
    needs = any(backend_for(m).prepares and backend_for(m).name not in m.prepared_backends()
                for m in modules if m.format == "nvfp4")
    stale = any(m.prepared_backends() - {backend_for(m).name} for m in modules if m.format == "nvfp4")
    if needs or stale:  # otherwise the pass below changes nothing: no need to unload the model
        comfy.model_management.unload_model_and_clones(patcher)
    bar = comfy.utils.ProgressBar(1)
    info = preparation.prepare_modules(modules, backend_for, device,
                                       progress=lambda i, n: bar.update_absolute(i, n))
    log.info("NVFP4: prepared %d layers in %.2f s (kernels compiled alongside in %.2f s, self-check %.2f s, min cosine %s), "
             "freed %d bytes", info["prepared_layers"], info["seconds"], info["compile_seconds"],
             info["self_check_seconds"], info["self_check_min_cosine"], info["freed_bytes"])
    return info


def make_wrapper(backend_name: str, node_id: str | None):
    def outer_sample(executor, *args, **kwargs):
        dm = executor.class_obj.model_patcher.model.diffusion_model
        path_report.reset_paths(dm)
        try:
            with active_backend(backend_name):
                return executor(*args, **kwargs)
        finally:
            counts = path_report.path_counts(dm)
            text = f"NVFP4 backend {backend_name}: " + path_report.summary_text(counts)
            log.info(text)
            if node_id is not None:
                LAST_SUMMARY[str(node_id)] = {"backend": backend_name, "paths": counts, "text": text}
                try:
                    from server import PromptServer
                    PromptServer.instance.send_progress_text(text, node_id)
                    PromptServer.instance.send_sync("nvfp4.paths", {"node": str(node_id), **LAST_SUMMARY[str(node_id)]})
                except Exception as e:  # reporting must never fail a finished sampling run
                    log.warning("NVFP4: could not send the path summary: %r", e)
    return outer_sample


def apply_backend(patcher, choice: str, node_id: str | None = None, fuse_blocks: bool = True):
    modules = nvfp4_modules(patcher)  # one walk of the model serves selection, preparation, report
    if not modules:
        raise ValueError("this MODEL has no NVFP4 layers: connect it to 'Load NVFP4 Diffusion Model'")
    device = comfy.model_management.get_torch_device()
    active, backend_for, chosen = select(patcher, modules, choice, device, fuse_blocks)
    info = prepare(patcher, modules, backend_for, device)
    model = patcher.clone()
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               make_wrapper(active, node_id))
    block_patches.remove(model)
    fusion = None
    if fuse_blocks and any(m.format == "nvfp4" and backend_for(m).name == fused_blocks.BACKEND for m in modules):
        fusion = block_patches.install(model)
    formats = path_report.format_counts(modules)
    text = (f"{choice} -> {chosen}\non {registry.describe_device(device)}; layers: "
            + path_report.summary_text(formats))
    if fusion:
        text += "\n" + fusion
    if info["prepared_layers"]:
        cos = info["self_check_min_cosine"]
        compiled = f" (kernels compiled alongside in {info['compile_seconds']:.2f} s)" if info["compile_launches"] else ""
        text += (f"\nprepared {info['prepared_layers']} layers in {info['seconds']:.2f} s{compiled}"
                 + (f" (self-check {info['self_check_seconds']:.2f} s, worst cosine {cos:.4f})" if cos is not None
                    else " (self-check off)"))
    return model, active, text
