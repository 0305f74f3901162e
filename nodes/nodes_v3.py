"""The ComfyUI nodes (V3 API). Thin: the work is in quant/, kernels/ and the helpers here."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

import comfy.utils

from ..kernels import registry
from . import backend_apply, comfy_loading, model_files, routes

MODELS_FOLDER = "diffusion_models"


class NVFP4ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NVFP4ModelLoader",
            display_name="Load NVFP4 Diffusion Model",
            category="loaders/nvfp4",
            description="Load an NVFP4 FLUX.1 / FLUX.2 checkpoint (ModelOpt export or ComfyUI/BFL file) "
                        "into ComfyUI's own FLUX model, with NVFP4 linears.",
            inputs=[
                io.Combo.Input("ckpt_name", options=model_files.list_checkpoints(
                    folder_paths.get_folder_paths(MODELS_FOLDER)),
                    tooltip="a .safetensors file or a diffusers folder in models/diffusion_models"),
                io.Combo.Input("compute_dtype", options=list(comfy_loading.DTYPES), default="auto",
                               tooltip="dtype of activations and of non-quantized layers"),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, ckpt_name, compute_dtype) -> io.NodeOutput:
        path = model_files.resolve_checkpoint(folder_paths.get_folder_paths(MODELS_FOLDER), ckpt_name)
        bar = comfy.utils.ProgressBar(1)

        def progress(done, total):
            bar.update_absolute(done, total)

        return io.NodeOutput(comfy_loading.load_nvfp4_model(path, compute_dtype, progress))

    @classmethod
    def fingerprint_inputs(cls, ckpt_name, compute_dtype):
        try:
            p = model_files.resolve_checkpoint(folder_paths.get_folder_paths(MODELS_FOLDER), ckpt_name)
            return f"{p}:{p.stat().st_mtime_ns}"
        except FileNotFoundError:
            return ckpt_name


class NVFP4Backend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NVFP4Backend",
            display_name="NVFP4 GEMM Backend",
            category="loaders/nvfp4",
            description="Choose how the NVFP4 linears run. 'auto' takes the fastest this GPU has; "
                        "the node reports which path every layer took after sampling.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("backend", options=[registry.AUTO] + registry.names(), default=registry.AUTO),
                io.Boolean.Input("fuse_blocks", default=True, optional=True,
                                 tooltip="fp8: run FLUX.1 and FLUX.2 blocks with fused norm/modulation/"
                                         "quantization, QK-norm/RoPE and GELU/SiLU-gate kernels around the FP8 "
                                         "GEMMs"),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, backend, fuse_blocks=True) -> io.NodeOutput:
        out, _active, text = backend_apply.apply_backend(model, backend, cls.hidden.unique_id, fuse_blocks)
        return io.NodeOutput(out, ui=ui.PreviewText(text))


class NVFP4DemoConditioning(io.ComfyNode):
    """Seeded random text conditioning shaped for the model: lets a demo or test sample without
    downloading a text encoder. Images made from it are noise-like; it is not a prompt."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NVFP4DemoConditioning",
            display_name="NVFP4 Demo Conditioning (no text encoder)",
            category="loaders/nvfp4/testing",
            description="Random conditioning of the model's text width, for demos and tests without a "
                        "text encoder.",
            inputs=[io.Model.Input("model"), io.Int.Input("tokens", default=16, min=1, max=512),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model, tokens, seed) -> io.NodeOutput:
        return io.NodeOutput(demo_conditioning(model, tokens, seed))


def demo_conditioning(model, tokens: int, seed: int):
    import torch
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, tokens, dm.txt_in.in_features, generator=g)
    extra = {}
    if getattr(dm, "vector_in", None) is not None:
        extra["pooled_output"] = torch.randn(1, dm.vector_in.in_layer.in_features, generator=g)
    return [[ctx, extra]]


class NVFP4Extension(ComfyExtension):
    async def get_node_list(self):
        return [NVFP4ModelLoader, NVFP4Backend, NVFP4DemoConditioning]


async def comfy_entrypoint() -> NVFP4Extension:
    routes.register()
    return NVFP4Extension()
