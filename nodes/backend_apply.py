"""Attach a GEMM backend to a MODEL: select, prepare weights, wrap sampling, report paths."""
from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.patcher_extension

from ..kernels import registry
from ..kernels.module import ACTIVE_BACKEND, NVFP4LinearModule
from . import path_report

log = logging.getLogger("comfyui_nvfp4")
WRAPPER_KEY = "comfyui_nvfp4.backend"
LAST_SUMMARY: dict[str, dict] = {}  # node id -> last observed path summary (served at /nvfp4/paths)


def nvfp4_modules(patcher) -> list[NVFP4LinearModule]:
    return path_report.linear_modules(patcher.model.diffusion_model)


def prepare(patcher, backend: registry.Backend) -> dict:
    """Make the backend's weight layouts (once per backend per model) and free other backends'.

    Layouts are made from the CPU originals, so a model still loaded on the GPU is unloaded first.
    """
    modules = nvfp4_modules(patcher)
    needs = [m for m in modules if m.format == "nvfp4" and backend.name not in m.prepared_backends()
             and backend.prepares]
    stale = [m for m in modules if m.prepared_backends() - {backend.name}]
    info = {"prepared_layers": 0, "freed_bytes": 0, "seconds": 0.0}
    if not needs and not stale:
        return info
    t0 = time.perf_counter()
    comfy.model_management.unload_model_and_clones(patcher)
    for m in stale:
        info["freed_bytes"] += m.drop_prepared(keep=backend.name)
    for m in needs:
        m.set_prepared(backend.name, backend.prepare(m))
        info["prepared_layers"] += 1
    info["seconds"] = time.perf_counter() - t0
    log.info("NVFP4: prepared %d layers for %s in %.2f s, freed %d bytes of other layouts",
             info["prepared_layers"], backend.name, info["seconds"], info["freed_bytes"])
    return info


def make_wrapper(backend_name: str, node_id: str | None):
    def outer_sample(executor, *args, **kwargs):
        dm = executor.class_obj.model_patcher.model.diffusion_model
        path_report.reset_paths(dm)
        token = ACTIVE_BACKEND.set(backend_name)
        try:
            return executor(*args, **kwargs)
        finally:
            ACTIVE_BACKEND.reset(token)
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


def apply_backend(patcher, choice: str, node_id: str | None = None):
    if not nvfp4_modules(patcher):
        raise ValueError("this MODEL has no NVFP4 layers: connect it to 'Load NVFP4 Diffusion Model'")
    device = comfy.model_management.get_torch_device()
    backend = registry.resolve(choice, device)
    info = prepare(patcher, backend)
    model = patcher.clone()
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               make_wrapper(backend.name, node_id))
    formats = path_report.format_counts(patcher.model.diffusion_model)
    text = (f"{choice} -> {backend.name} on {registry.describe_device(device)}; layers: "
            + path_report.summary_text(formats))
    if info["prepared_layers"]:
        text += f"; prepared {info['prepared_layers']} layers in {info['seconds']:.2f} s"
    return model, backend, text
