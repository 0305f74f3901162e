"""End to end in a real ComfyUI: /object_info, /prompt, /ws, /history."""
import pytest
import torch
from safetensors.torch import load_file

from workflows import nvfp4_prompt

ARCHS = ["flux1", "flux2"]


def latent_of(server, result):
    out = result["history"]["outputs"]["7"]["latents"][0]
    path = server.base / "output" / out.get("subfolder", "") / out["filename"]
    return load_file(str(path))["latent_tensor"].float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def combo_options(spec):
    """V1 combos are [options, {...}]; V3 ones are ["COMBO", {"options": [...]}]."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_nodes_in_object_info(server):
    info = server.get("/object_info")
    loader, backend = info["NVFP4ModelLoader"], info["NVFP4Backend"]
    assert loader["display_name"] == "Load NVFP4 Diffusion Model"
    assert backend["display_name"] == "NVFP4 GEMM Backend"
    names = combo_options(loader["input"]["required"]["ckpt_name"])
    assert {"flux1_comfy.safetensors", "flux1_modelopt", "flux2_comfy.safetensors", "flux2_modelopt"} <= set(names)
    choices = combo_options(backend["input"]["required"]["backend"])
    assert choices[0] == "auto" and {"dequant", "emulate"} <= set(choices)
    assert "model" in backend["input"]["required"]


def test_backends_route(server):
    r = server.get("/nvfp4/backends")
    by = {b["name"]: b for b in r["backends"]}
    assert by["dequant"]["available"] and by["emulate"]["available"]
    assert "CPU" in r["device"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("flavour", ["comfy", "modelopt"])
def test_dequant_matches_bf16_reference_workflow(server, arch, flavour):
    ckpt = f"{arch}_{flavour}.safetensors" if flavour == "comfy" else f"{arch}_{flavour}"
    ours = server.run(nvfp4_prompt(ckpt, "dequant", arch, prefix=f"d_{arch}_{flavour}"))
    assert ours["status"] == "success", ours["errors"] or server.log_text()[-3000:]
    ref = server.run(nvfp4_prompt(f"{arch}_{flavour}_dequant_ref.safetensors", arch=arch, loader="core",
                                  prefix=f"r_{arch}_{flavour}"))
    assert ref["status"] == "success", ref["errors"]
    a, b = latent_of(server, ours), latent_of(server, ref)
    assert a.shape == b.shape and torch.isfinite(a).all()
    assert rel(a, b) <= 1e-3, rel(a, b)
    texts = server.progress_texts(ours["messages"], "2")
    assert texts and "dequant:" in texts[-1] and "bf16:" in texts[-1], texts
