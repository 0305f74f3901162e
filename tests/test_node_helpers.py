"""The node-side logic that needs no ComfyUI: which files the loader offers, path summaries."""
import torch

from comfyui_nvfp4.kernels.module import NVFP4LinearModule
from comfyui_nvfp4.nodes import model_files, path_report
from comfyui_nvfp4.quant import names
from comfyui_nvfp4.quant.layers import DenseLinear
from comfyui_nvfp4.quant.synthetic import write_synthetic
from comfyui_nvfp4.quant.shapes import FluxDims


def test_checkpoint_list_has_files_and_diffusers_folders(tmp_path):
    root = tmp_path / "diffusion_models"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub" / "b.safetensors").write_bytes(b"x")
    (root / ".hidden.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    write_synthetic(root / "flux_diffusers", FluxDims.tiny(names.FLUX1), naming=names.DIFFUSERS)
    pipe = root / "pipeline" / "transformer"
    write_synthetic(pipe, FluxDims.tiny(names.FLUX2), naming=names.DIFFUSERS)
    found = model_files.list_checkpoints([str(root), str(tmp_path / "missing")])
    assert found == ["a.safetensors", "flux_diffusers", "pipeline", "sub/b.safetensors"]
    assert model_files.resolve_checkpoint([str(root)], "flux_diffusers") == root / "flux_diffusers"


def test_path_summary_counts_every_layer():
    model = torch.nn.Sequential(*[NVFP4LinearModule(16, 16, bias=False) for _ in range(3)])
    for m in model:
        m.set_layer(DenseLinear(torch.eye(16)))
    assert path_report.path_counts(model) == {"not run": 3}
    model(torch.randn(2, 16))
    assert path_report.path_counts(model) == {"bf16": 3}
    assert path_report.summary_text({"fp8": 228, "fp8-gemv": 76, "bf16": 1}) == \
        "fp8: 228 layers, fp8-gemv: 76 layers, bf16: 1 layer"
    path_report.reset_paths(model)
    assert path_report.path_counts(model) == {"not run": 3}
