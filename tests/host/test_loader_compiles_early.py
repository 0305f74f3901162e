"""Our loader node starts compiling the backends' kernels as it reads each layer of a checkpoint
(ComfyUI imported in this process, on the CPU). The backends `auto` may pick on the CPU compile
nothing, so `auto_candidates` is pointed at a backend whose kernels are the Triton-like JIT
stand-in of tests/test_compile_ahead.py under the real compile machinery; tests/gpu and the
VRAM-mode host tests run the real kernels on a GPU."""
import logging

import torch

from comfyui_nvfp4.quant import quantize_checkpoint
from comfyui_nvfp4.quant.names import FLUX1
from comfyui_nvfp4.quant.shapes import FluxDims
from comfyui_nvfp4.quant.synthetic import write_synthetic
from test_compile_ahead import _CompilingCopy


def _checkpoint(tmp_path):
    bf = tmp_path / "bf.safetensors"
    write_synthetic(bf, FluxDims.tiny(FLUX1), seed=3)
    ck = tmp_path / "q.safetensors"
    quantize_checkpoint(bf, "comfy", ck, progress=False)
    return ck


class _Broken(_CompilingCopy):
    name = "broken-compile"

    def compile_ahead(self, modules, device):
        raise RuntimeError("no compiler here")


def test_the_loader_compiles_each_layer_shape_while_reading(comfy, tmp_path, monkeypatch, caplog):
    from comfyui_nvfp4.kernels import autotune, compile_ahead, preparation
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model
    from comfyui_nvfp4.nodes.path_report import linear_modules
    compile_ahead.forget()
    b = _CompilingCopy()
    monkeypatch.setattr(autotune, "auto_candidates", lambda device, dtype=None: [b])
    with caplog.at_level(logging.INFO, logger="comfyui_nvfp4"):
        dm = load_nvfp4_model(_checkpoint(tmp_path), "bf16").model.diffusion_model
    from comfyui_nvfp4.kernels.triton_common import LayerShape
    mods = [m for m in linear_modules(dm) if m.format == "nvfp4"]
    shapes = {LayerShape.of(m) for m in mods}
    widths = sorted({m.out_features for m in mods})
    assert len(widths) > 1
    # one launch per layer shape; shapes of one width share its variant, which compiles once
    assert f"compiling {len(shapes)} kernel launches in the background for {b.name}" in caplog.text
    assert sorted(v for what, v in b.log if what == "compile") == widths
    info = preparation.prepare_modules(mods, b, torch.device("cpu"), self_check=True, workers=1)
    assert info["prepared_layers"] == len(mods) and info["compile_launches"] == 0
    assert sorted(v for what, v in b.log if what == "compile") == widths  # nothing compiled again
    compile_ahead.forget()


def test_a_failing_early_start_never_fails_the_load(comfy, tmp_path, monkeypatch, caplog):
    from comfyui_nvfp4.kernels import autotune
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model
    monkeypatch.setattr(autotune, "auto_candidates", lambda device, dtype=None: [_Broken()])
    with caplog.at_level(logging.WARNING, logger="comfyui_nvfp4"):
        patcher = load_nvfp4_model(_checkpoint(tmp_path), "bf16")
    assert patcher is not None
    assert caplog.text.count("could not start compiling kernels while loading (no compiler here)") == 1


class _AsW4A16(_CompilingCopy):
    name = "w4a16"


def test_a_forced_backend_is_the_only_one_compiled(comfy, tmp_path, monkeypatch):
    from comfyui_nvfp4.kernels import autotune, compile_ahead, env_override
    from comfyui_nvfp4.nodes.comfy_loading import load_nvfp4_model
    compile_ahead.forget()
    forced, other = _AsW4A16(), _CompilingCopy()
    monkeypatch.setattr(autotune, "auto_candidates", lambda device, dtype=None: [other, forced])
    monkeypatch.setenv(env_override.ENV_VAR, "W4A16")
    load_nvfp4_model(_checkpoint(tmp_path), "bf16")
    assert any(what == "compile" for what, _ in forced.log) and other.log == []
    compile_ahead.forget()
