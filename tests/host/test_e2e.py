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
    if not torch.cuda.is_available():
        assert "CPU" in r["device"] and not by["fp8"]["available"] and "CUDA" in by["fp8"]["reason"]


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


@pytest.mark.parametrize("arch", ARCHS)
def test_emulate_within_nvfp4_error_of_bf16_original(server, arch):
    ckpt = f"{arch}_comfy.safetensors"
    emu = server.run(nvfp4_prompt(ckpt, "emulate", arch, prefix=f"e_{arch}"))
    deq = server.run(nvfp4_prompt(ckpt, "dequant", arch, prefix=f"e_d_{arch}"))
    orig = server.run(nvfp4_prompt(f"{arch}_bf16.safetensors", arch=arch, loader="core", prefix=f"e_o_{arch}"))
    for r in (emu, deq, orig):
        assert r["status"] == "success", r["errors"]
    e, d, o = (latent_of(server, r) for r in (emu, deq, orig))
    weight_only, w4a4 = rel(d, o), rel(e, o)
    # Activation quantization adds error on top of the weight error, of the same order (NVFP4 on
    # both operands), and it is really applied (emulate != dequant).
    assert 0 < weight_only < 0.25 and weight_only < w4a4 < 3 * weight_only + 0.05, (weight_only, w4a4)
    assert rel(e, d) > 1e-3
    texts = server.progress_texts(emu["messages"], "2")
    assert texts and "emulate:" in texts[-1]


def test_switching_backend_between_prompts(server):
    a = server.run(nvfp4_prompt("flux1_modelopt", "dequant", prefix="sw_a"))
    b = server.run(nvfp4_prompt("flux1_modelopt", "emulate", prefix="sw_b"))
    c = server.run(nvfp4_prompt("flux1_modelopt", "auto", prefix="sw_c"))
    for r in (a, b, c):
        assert r["status"] == "success", r["errors"]
    la, lb, lc = (latent_of(server, r) for r in (a, b, c))
    assert rel(lb, la) > 1e-3
    assert "emulate" in server.progress_texts(b["messages"], "2")[-1]
    paths = server.get("/nvfp4/paths")["2"]
    assert paths["backend"] == "auto"
    if set(paths["paths"]) <= {"dequant", "bf16"}:
        assert torch.equal(la, lc)  # auto chose dequant (a CPU), and the loaded model is reused
    else:  # a GPU: auto picked faster paths per layer; same model, their own rounding
        assert rel(lc, la) < 0.1 and torch.isfinite(lc).all()


def test_malformed_checkpoint_is_a_clear_node_error_and_server_survives(server):
    bad = server.run(nvfp4_prompt("broken.safetensors", "dequant", prefix="bad"))
    assert bad["status"] == "error"
    err = bad["errors"][0]
    assert err["node_type"] == "NVFP4ModelLoader"
    assert "broken.safetensors" in err["exception_message"] and "truncated" in err["exception_message"]
    ok = server.run(nvfp4_prompt("flux2_modelopt", "dequant", "flux2", prefix="after_bad"))
    assert ok["status"] == "success", ok["errors"]


def test_unavailable_backend_is_a_clear_node_error(server):
    info = server.get("/nvfp4/backends")
    missing = [b for b in info["backends"] if not b["available"]]
    if not missing:
        pytest.skip("every backend is available on this server's device")
    r = server.run(nvfp4_prompt("flux1_comfy.safetensors", missing[0]["name"], prefix="unavail"))
    assert r["status"] == "error"
    msg = r["errors"][0]["exception_message"]
    assert missing[0]["name"] in msg and "Available here:" in msg and "dequant" in msg and info["device"] in msg


def test_example_workflows_are_templates_and_valid(server):
    import json
    from pathlib import Path

    listed = server.get("/workflow_templates")
    ours = set(listed.get("comfyui_nvfp4", []))
    assert {"flux1_nvfp4_text_to_image", "flux2_nvfp4_text_to_image"} <= ours
    info = server.get("/object_info")
    for name in ours:
        wf = server.get(f"/api/workflow_templates/comfyui_nvfp4/{name}.json")
        assert wf == json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / f"{name}.json").read_text())
        nodes = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            assert n["type"] in info, n["type"]  # only core nodes and ours
            spec = info[n["type"]]
            widgets = [k for k, v in {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}.items()
                       if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            extra = 1 if "control_after_generate" in json.dumps(spec) or n["type"] == "KSampler" else 0
            assert len(n["widgets_values"]) in (len(widgets), len(widgets) + extra), (n["type"], widgets)
        for lid, src, sslot, dst, dslot, typ in wf["links"]:
            assert info[nodes[src]["type"]]["output"][sslot] == typ
            assert nodes[dst]["inputs"][dslot]["type"] == typ
