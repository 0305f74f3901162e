"""Reading, naming, converting and quantizing real (generated) safetensors checkpoints."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_nvfp4.quant import (COMFY, MODELOPT, Checkpoint, convert_checkpoint, names,
                                 quantize_checkpoint)
from comfyui_nvfp4.quant.layers import NVFP4Linear
from comfyui_nvfp4.quant.shapes import FluxDims, linear_shapes
from reference import dequant_stored

ARCHS = [names.FLUX1, names.FLUX2]


def raw(path):
    """All tensors of a checkpoint file or diffusers folder, as stored."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_flavour_architecture_and_naming_detected(ckpts, arch):
    c = Checkpoint(ckpts[arch, "comfy"])
    m = Checkpoint(ckpts[arch, "modelopt"])
    b = Checkpoint(ckpts[arch, "bf16"])
    assert (c.flavour, c.naming, c.architecture) == ("comfy", "bfl", arch)
    assert (m.flavour, m.naming, m.architecture) == ("modelopt", "diffusers", arch)
    assert (b.flavour, b.architecture) == ("bf16", arch)
    expected = linear_shapes(FluxDims.tiny(arch, depth=2, depth_single=2))
    for ck in (c, m, b):
        assert {n: i.shape for n, i in ck.layers.items()} == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_comfy_layers_equal_independent_dequantization_of_stored_tensors(ckpts, arch):
    path = ckpts[arch, "comfy"]
    ck = Checkpoint(path)
    t = raw(path)
    n_nvfp4 = 0
    for name, info in ck.layers.items():
        layer = ck.load_linear(name)
        if info.format != "nvfp4":
            assert torch.equal(layer.weight, t[f"{name}.weight"])
            continue
        n_nvfp4 += 1
        n, k = info.shape
        ref = dequant_stored(t[f"{name}.weight"], t[f"{name}.weight_scale"], float(t[f"{name}.weight_scale_2"]),
                             n, k, low_nibble_first=False, swizzled=True)
        assert np.array_equal(layer.dequantize(torch.float64).numpy(), ref), name
    assert n_nvfp4 >= 20  # every block linear of the 2+2-block model


@pytest.mark.parametrize("arch", ARCHS)
def test_modelopt_layers_equal_independent_dequantization_of_stored_tensors(ckpts, arch):
    path = ckpts[arch, "modelopt"]
    ck = Checkpoint(path)
    t = raw(path)
    for name, info in ck.layers.items():
        if info.format != "nvfp4":
            continue
        spec = ck.names.linears[name]
        pieces = []
        for m in spec.sources:
            n = t[f"{m}.weight"].shape[0]
            k = t[f"{m}.weight"].shape[1] * 2
            pieces.append(dequant_stored(t[f"{m}.weight"], t[f"{m}.weight_scale"], float(t[f"{m}.weight_scale_2"]),
                                         n, k, low_nibble_first=True, swizzled=False))
        ref = np.concatenate(pieces)
        if spec.swap_halves:
            ref = np.concatenate(np.split(ref, 2)[::-1])
        assert np.array_equal(ck.load_linear(name).dequantize(torch.float64).numpy(), ref), name


def test_flux1_proj_mlp_keeps_its_own_global_scale_exactly(ckpts):
    ck = Checkpoint(ckpts[names.FLUX1, "modelopt"])
    t = raw(ckpts[names.FLUX1, "modelopt"])
    pre = "single_transformer_blocks.0."
    assert not torch.equal(t[pre + "attn.to_q.weight_scale_2"], t[pre + "proj_mlp.weight_scale_2"])
    assert torch.equal(t[pre + "attn.to_q.weight_scale_2"], t[pre + "attn.to_v.weight_scale_2"])
    layer = ck.load_linear("single_blocks.0.linear1")
    assert isinstance(layer, NVFP4Linear) and len(layer.parts) == 2
    assert [p.shape[0] for p in layer.parts] == [3 * 128, 4 * 128]
    assert torch.equal(layer.parts[1].global_scale, t[pre + "proj_mlp.weight_scale_2"])
    # q/k/v unified by ModelOpt: img qkv is one exact part.
    assert len(ck.load_linear("double_blocks.0.img_attn.qkv").parts) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_both_flavours_dequantize_close_to_the_bf16_source(ckpts, arch):
    src = Checkpoint(ckpts[arch, "bf16"])
    for flavour in ("comfy", "modelopt"):
        ck = Checkpoint(ckpts[arch, flavour])
        for name, info in ck.layers.items():
            w = src.load_linear(name).dequantize()
            q = ck.load_linear(name).dequantize()
            err = float((q - w).norm() / w.norm())
            assert err < (0.13 if info.format == "nvfp4" else 1e-6), (flavour, name, err)


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_and_bfl_bf16_sources_give_identical_layers(ckpts, arch):
    a, b = Checkpoint(ckpts[arch, "bf16"]), Checkpoint(ckpts[arch, "bf16_diffusers"])
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        la, lb = a.load_linear(name), b.load_linear(name)
        assert torch.equal(la.weight, lb.weight), name  # includes the norm_out half swap
        assert (la.bias is None and lb.bias is None) or torch.equal(la.bias, lb.bias)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.load_param(k), b.load_param(k))


def test_norm_out_halves_are_swapped_between_namings(ckpts):
    bfl = raw(ckpts[names.FLUX1, "bf16"])["final_layer.adaLN_modulation.1.weight"]
    dif = raw(ckpts[names.FLUX1, "bf16_diffusers"])["norm_out.linear.weight"]
    h = bfl.shape[0] // 2
    assert torch.equal(bfl[:h], dif[h:]) and torch.equal(bfl[h:], dif[:h])


@pytest.mark.parametrize("arch", ARCHS)
def test_comfy_to_modelopt_to_comfy_is_byte_identical(ckpts, arch, tmp_path):
    src = ckpts[arch, "comfy"]
    convert_checkpoint(src, "modelopt", tmp_path / "mo", progress=False)
    assert Checkpoint(tmp_path / "mo").flavour == MODELOPT
    convert_checkpoint(tmp_path / "mo", "comfy", tmp_path / "back.safetensors", progress=False)
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_modelopt_to_comfy_to_modelopt_round_trip(ckpts, arch, tmp_path):
    src = ckpts[arch, "modelopt"]
    rep = convert_checkpoint(src, "comfy", tmp_path / "c.safetensors", progress=False)
    convert_checkpoint(tmp_path / "c.safetensors", "modelopt", tmp_path / "back", progress=False)
    a, b = raw(src), raw(tmp_path / "back")
    assert a.keys() == b.keys()
    rescaled_modules = {s for n in rep.rescaled for s in names.build_name_map(arch, 2, 2, True, arch == "flux1")
                        .linears[n].sources}
    for k in a:
        if k.rsplit(".", 1)[0] in rescaled_modules:
            continue
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).tolist() == b[k].reshape(-1).view(torch.uint8).tolist(), k
    if arch == names.FLUX1:
        # Only the single-block linear1 layers had parts with different weight_scale_2.
        assert set(rep.rescaled) == {"single_blocks.0.linear1", "single_blocks.1.linear1"}
        assert all(0 < e < 0.05 for e in rep.rescaled.values())
    else:
        assert rep.rescaled == {}
        assert (tmp_path / "back" / "diffusion_pytorch_model.safetensors").read_bytes() == \
            (src / "diffusion_pytorch_model.safetensors").read_bytes()


def test_converted_comfy_file_has_comfy_metadata_and_layout(ckpts, tmp_path):
    out = tmp_path / "c.safetensors"
    convert_checkpoint(ckpts[names.FLUX1, "modelopt"], "comfy", out, progress=False)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
        assert meta["format_version"] == "1.0"
        assert meta["layers"]["double_blocks.0.img_attn.qkv"] == {"format": "nvfp4"}
        assert "img_in" not in meta["layers"]
        assert f.get_slice("double_blocks.0.img_attn.qkv.weight_scale").get_shape() == [384, 8]
        assert f.get_slice("double_blocks.0.img_attn.qkv.weight").get_shape() == [384, 64]


def test_sharded_diffusers_folder_with_index(ckpts, tmp_path):
    src = raw(ckpts[names.FLUX1, "modelopt"])
    keys = sorted(src)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(ckpts[names.FLUX1, "modelopt"] / "config.json", folder / "config.json")
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fn = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: src[k] for k in part}, str(folder / fn))
        wm.update({k: fn for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    a, b = Checkpoint(folder), Checkpoint(ckpts[names.FLUX1, "modelopt"])
    assert len(a.store.files) == 2
    for name in a.layers:
        assert torch.equal(a.load_linear(name).dequantize(), b.load_linear(name).dequantize())


def test_hf_quant_config_folder_and_leftover_amax_keys(ckpts, tmp_path):
    src = raw(ckpts[names.FLUX2, "modelopt"])
    src["transformer_blocks.0.attn.k_bmm_quantizer._amax"] = torch.tensor(3.0)
    src["transformer_blocks.0.attn.bmm2_output_quantizer._amax"] = torch.tensor(1.0)
    folder = tmp_path / "hfq"
    folder.mkdir()
    save_file(src, str(folder / "model.safetensors"))
    (folder / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                           "exclude_modules": ["x_embedder"]}}))
    ck = Checkpoint(folder)
    assert ck.flavour == MODELOPT and ck.architecture == names.FLUX2
    assert ck.is_excluded_by_config("img_in")
    ref = Checkpoint(ckpts[names.FLUX2, "modelopt"])
    for name in ck.layers:
        assert torch.equal(ck.load_linear(name).dequantize(), ref.load_linear(name).dequantize())


def test_comfy_quant_tensors_instead_of_header(ckpts, tmp_path):
    path = ckpts[names.FLUX1, "comfy"]
    t = raw(path)
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    for name, conf in layers.items():
        t[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    out = tmp_path / "cq.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in t.items()}, str(out))
    ck, ref = Checkpoint(out), Checkpoint(path)
    assert ck.flavour == COMFY and ck.layers.keys() == ref.layers.keys()
    for name in ck.layers:
        assert torch.equal(ck.load_linear(name).dequantize(), ref.load_linear(name).dequantize())


def test_mixed_comfy_file_with_fp8_layer_and_missing_input_scale(ckpts, tmp_path):
    t = raw(ckpts[names.FLUX2, "comfy"])
    with safe_open(str(ckpts[names.FLUX2, "comfy"]), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
    w = torch.randn(128, 128) * 0.05
    name = "double_blocks.0.img_attn.proj"
    for s in ("weight", "weight_scale", "weight_scale_2"):
        t.pop(f"{name}.{s}")
    scale = w.abs().max() / 448
    t[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
    t[f"{name}.weight_scale"] = scale.float()
    meta["layers"][name] = {"format": "float8_e4m3fn"}
    out = tmp_path / "mixed.safetensors"
    save_file(t, str(out), metadata={"_quantization_metadata": json.dumps(meta)})
    ck = Checkpoint(out)
    before = Checkpoint(ckpts[names.FLUX2, "comfy"]).summary()["layer_counts"]
    assert ck.layers[name].format == "fp8"
    assert ck.summary()["layer_counts"] == {"bf16": before["bf16"], "nvfp4": before["nvfp4"] - 1, "fp8": 1}
    assert ck.summary()["missing_input_scale"]  # no input_scale anywhere: dynamic amax at run time
    deq = ck.load_linear(name).dequantize()
    assert (deq - w).norm() / w.norm() < 0.05
    with pytest.raises(ValueError, match="FP8"):
        convert_checkpoint(out, "modelopt", tmp_path / "nope", progress=False)
    assert not (tmp_path / "nope").exists()


def test_quantize_exclusions_and_calibration(ckpts, tmp_path):
    cal = {"double_blocks.0.img_attn.qkv": torch.tensor(3.0),
           "transformer_blocks.1.attn.to_out.0": torch.randn(10, 128)}
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(ckpts[names.FLUX1, "bf16"], "comfy", out, progress=False, calibration=cal,
                        exclude=["*txt_mlp*", "single_transformer_blocks.1.proj_out"])
    ck = Checkpoint(out)
    fm = {n: i.format for n, i in ck.layers.items()}
    for n in ("img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
              "final_layer.linear", "final_layer.adaLN_modulation.1", "double_blocks.0.txt_mlp.0",
              "single_blocks.1.linear2"):
        assert fm[n] == "bf16", n
    assert fm["double_blocks.0.img_mlp.0"] == "nvfp4" and fm["single_blocks.0.linear2"] == "nvfp4"
    assert ck.load_linear("double_blocks.0.img_attn.qkv").parts[0].input_scale == pytest.approx(3.0 / 2688)
    amax = float(cal["transformer_blocks.1.attn.to_out.0"].abs().max())
    assert ck.load_linear("double_blocks.1.img_attn.proj").parts[0].input_scale == pytest.approx(amax / 2688)
    assert ck.load_linear("double_blocks.1.img_mlp.0").parts[0].input_scale is None


def test_outputs_are_not_overwritten_without_force(ckpts, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        convert_checkpoint(ckpts[names.FLUX1, "modelopt"], "comfy", out, progress=False)
    assert out.read_bytes() == b"keep me"
    convert_checkpoint(ckpts[names.FLUX1, "modelopt"], "comfy", out, overwrite=True, progress=False)
    assert Checkpoint(out).flavour == COMFY
