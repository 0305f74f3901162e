"""Every kind of bad input gets a typed error naming the file, the tensor and what was expected."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_nvfp4.quant import Checkpoint, convert_checkpoint, names, verify_checkpoint
from comfyui_nvfp4.quant.errors import (BadScaleError, CheckpointError, DTypeMismatchError,
                                        MissingTensorError, NotFluxError, ShapeMismatchError,
                                        TruncatedFileError, UnknownFlavourError, UnsupportedShapeError)

LAYER = "double_blocks.0.img_attn.qkv"
MO_LAYER = "transformer_blocks.0.attn.to_q"


def comfy_copy(ckpts, tmp_path, edit, arch=names.FLUX1):
    src = ckpts[arch, "comfy"]
    t = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    edit(t)
    out = tmp_path / "bad.safetensors"
    save_file(t, str(out), metadata=meta)
    return out


def modelopt_copy(ckpts, tmp_path, edit, arch=names.FLUX1):
    src = ckpts[arch, "modelopt"]
    t = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    edit(t)
    out = tmp_path / "bad_mo"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    save_file(t, str(out / "diffusion_pytorch_model.safetensors"))
    return out


def check(err, path, tensor=None):
    msg = str(err.value)
    assert str(path) in msg
    if tensor:
        assert tensor in msg and err.value.tensor == tensor


def test_truncated_file(ckpts, tmp_path):
    data = ckpts[names.FLUX1, "comfy"].read_bytes()
    out = tmp_path / "trunc.safetensors"
    out.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TruncatedFileError) as e:
        Checkpoint(out)
    check(e, out)


def test_not_a_safetensors_file(tmp_path):
    out = tmp_path / "junk.safetensors"
    out.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(out)
    check(e, out)


def test_not_flux(tmp_path):
    out = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(out))
    with pytest.raises(NotFluxError) as e:
        Checkpoint(out)
    check(e, out)
    assert "FLUX" in str(e.value)


def test_missing_weight_scale_2(ckpts, tmp_path):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.pop(f"{LAYER}.weight_scale_2"))
    with pytest.raises(MissingTensorError) as e:
        Checkpoint(out)
    check(e, out, f"{LAYER}.weight_scale_2")


def test_missing_weight_scale_modelopt(ckpts, tmp_path):
    out = modelopt_copy(ckpts, tmp_path, lambda t: t.pop(f"{MO_LAYER}.weight_scale"))
    with pytest.raises(MissingTensorError) as e:
        Checkpoint(out)
    check(e, out, f"{MO_LAYER}.weight_scale")


def test_scale_shape_not_matching_weight(ckpts, tmp_path):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{LAYER}.weight_scale",
                                                               t[f"{LAYER}.weight_scale"][:200]))
    with pytest.raises(ShapeMismatchError) as e:
        Checkpoint(out)
    check(e, out, f"{LAYER}.weight_scale")
    assert "[384, 8]" in str(e.value) and "[200, 8]" in str(e.value)


def test_modelopt_scale_shape_mismatch(ckpts, tmp_path):
    out = modelopt_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{MO_LAYER}.weight_scale",
                                                                  t[f"{MO_LAYER}.weight_scale"][:, :4].contiguous()))
    with pytest.raises(ShapeMismatchError) as e:
        Checkpoint(out)
    check(e, out, f"{MO_LAYER}.weight_scale")


def test_wrong_weight_dtype(ckpts, tmp_path):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{LAYER}.weight",
                                                               t[f"{LAYER}.weight"].to(torch.bfloat16)))
    with pytest.raises(DTypeMismatchError) as e:
        Checkpoint(out)
    check(e, out, f"{LAYER}.weight")


def test_wrong_scale_dtype(ckpts, tmp_path):
    out = modelopt_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{MO_LAYER}.weight_scale",
                                                                  t[f"{MO_LAYER}.weight_scale"].float()))
    with pytest.raises(DTypeMismatchError) as e:
        Checkpoint(out)
    check(e, out, f"{MO_LAYER}.weight_scale")


@pytest.mark.parametrize("value", [0.0, float("inf"), float("nan"), -1.0])
def test_bad_global_scale(ckpts, tmp_path, value):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{LAYER}.weight_scale_2", torch.tensor(value)))
    ck = Checkpoint(out)  # headers are fine; the value is checked when the layer is read
    with pytest.raises(BadScaleError) as e:
        ck.load_linear(LAYER)
    check(e, out, f"{LAYER}.weight_scale_2")
    r = verify_checkpoint(out, progress=False)
    assert not r["ok"] and any(LAYER in p for p in r["problems"])


def test_nan_block_scale(ckpts, tmp_path):
    def edit(t):
        s = t[f"{MO_LAYER}.weight_scale"].view(torch.uint8).clone()
        s[3, 2] = 0x7F
        t[f"{MO_LAYER}.weight_scale"] = s.view(torch.float8_e4m3fn)
    out = modelopt_copy(ckpts, tmp_path, edit)
    with pytest.raises(BadScaleError) as e:
        Checkpoint(out).load_linear(LAYER)
    check(e, out, f"{MO_LAYER}.weight_scale")
    assert "[3, 2]" in str(e.value)


def test_bad_input_scale(ckpts, tmp_path):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.__setitem__(f"{LAYER}.input_scale", torch.tensor(0.0)))
    with pytest.raises(BadScaleError) as e:
        Checkpoint(out).load_linear(LAYER)
    check(e, out, f"{LAYER}.input_scale")


def test_k_not_multiple_of_16(ckpts, tmp_path):
    def edit(t):
        for s in ("to_q", "to_k", "to_v"):
            t[f"transformer_blocks.0.attn.{s}.weight"] = t[f"transformer_blocks.0.attn.{s}.weight"][:, :60].contiguous()
    out = modelopt_copy(ckpts, tmp_path, edit)
    with pytest.raises(UnsupportedShapeError) as e:
        Checkpoint(out)
    check(e, out, f"{MO_LAYER}.weight")
    assert "K = 120" in str(e.value)


def test_packed_weights_without_any_config(ckpts, tmp_path):
    src = ckpts[names.FLUX1, "modelopt"] / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "bare.safetensors"
    out.write_bytes(src.read_bytes())
    with pytest.raises(UnknownFlavourError) as e:
        Checkpoint(out)
    check(e, out)
    assert Checkpoint(out, flavour="modelopt").flavour == "modelopt"  # the user can say


def test_flavour_override_cannot_contradict_metadata(ckpts):
    with pytest.raises(UnknownFlavourError):
        Checkpoint(ckpts[names.FLUX1, "comfy"], flavour="modelopt")


def test_unmapped_diffusers_key_is_not_dropped(ckpts, tmp_path):
    out = modelopt_copy(ckpts, tmp_path, lambda t: t.__setitem__("transformer_blocks.0.mystery.weight",
                                                                  torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="map to no ComfyUI") as e:
        Checkpoint(out)
    check(e, out, "transformer_blocks.0.mystery.weight")


def test_failed_conversion_writes_nothing(ckpts, tmp_path):
    out = comfy_copy(ckpts, tmp_path, lambda t: t.__setitem__("single_blocks.1.linear2.weight_scale_2",
                                                               torch.tensor(float("nan"))))
    dest = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    with pytest.raises(BadScaleError):
        convert_checkpoint(out, "modelopt", dest, progress=False)
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary left behind


def test_bad_quantization_metadata_format(ckpts, tmp_path):
    src = ckpts[names.FLUX1, "comfy"]
    t = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
    meta["layers"][LAYER] = {"format": "nvfp8_magic"}
    out = tmp_path / "m.safetensors"
    save_file(t, str(out), metadata={"_quantization_metadata": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="nvfp8_magic") as e:
        Checkpoint(out)
    check(e, out, f"{LAYER}.weight")
