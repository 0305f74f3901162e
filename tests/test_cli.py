"""The `nvfp4` command line: inspect, verify, convert, quantize, synth."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_nvfp4.quant import Checkpoint, names
from comfyui_nvfp4.quant.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("arch", [names.FLUX1, names.FLUX2])
@pytest.mark.parametrize("flavour", ["comfy", "modelopt"])
def test_inspect_json(ckpts, capsys, arch, flavour):
    code, out, _ = run(capsys, "inspect", ckpts[arch, flavour], "--json")
    assert code == 0
    d = json.loads(out)
    assert d["flavour"] == flavour and d["architecture"] == arch
    qkv = d["layers"]["double_blocks.0.img_attn.qkv"]
    assert qkv["format"] == "nvfp4" and qkv["shape"] == [384, 128]
    assert d["layers"]["img_in"]["format"] == "bf16"
    assert all(k in d for k in ("layer_counts", "missing_input_scale", "file_bytes", "params"))


def test_inspect_text(ckpts, capsys):
    code, out, _ = run(capsys, "inspect", ckpts[names.FLUX1, "modelopt"])
    assert code == 0
    assert "flavour: modelopt" in out and "single_blocks.0.linear1" in out and "nvfp4" in out


@pytest.mark.parametrize("ref", ["bf16", "bf16_diffusers"])
def test_verify_against_reference_in_either_naming(ckpts, capsys, ref):
    code, out, _ = run(capsys, "verify", ckpts[names.FLUX1, "comfy"], "--reference", ckpts[names.FLUX1, ref],
                       "--json", "-q")
    d = json.loads(out)
    assert code == 0 and d["ok"] is True
    errs = [v["rel_err"] for v in d["layers"].values() if "rel_err" in v]
    assert len(errs) >= 20 and all(0.05 < e < 0.13 for e in errs)


def test_verify_catches_wrong_nibble_order(ckpts, capsys, tmp_path):
    src = ckpts[names.FLUX1, "comfy"]
    t = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    for name in layers:
        w = t[f"{name}.weight"]
        t[f"{name}.weight"] = ((w & 0x0F) << 4) | (w >> 4)  # the bug peers shipped
    bad = tmp_path / "swapped.safetensors"
    save_file(t, str(bad), metadata=meta)
    code, out, _ = run(capsys, "verify", bad, "--reference", ckpts[names.FLUX1, "bf16"], "--json", "-q")
    d = json.loads(out)
    assert code == 1 and d["ok"] is False
    errs = [v["rel_err"] for v in d["layers"].values() if "rel_err" in v]
    assert min(errs) > 1.0


def test_verify_without_reference_and_text_output(ckpts, capsys):
    code, out, _ = run(capsys, "verify", ckpts[names.FLUX2, "modelopt"], "-q")
    assert code == 0 and "OK" in out


def test_convert_and_quantize_commands(ckpts, capsys, tmp_path):
    code, out, _ = run(capsys, "convert", ckpts[names.FLUX1, "modelopt"], "--to", "comfy", "-o",
                       tmp_path / "c.safetensors", "-q")
    assert code == 0 and "rescaled" in out  # FLUX.1 proj_mlp note
    assert Checkpoint(tmp_path / "c.safetensors").flavour == "comfy"
    code, out, _ = run(capsys, "quantize", ckpts[names.FLUX2, "bf16"], "--format", "modelopt", "-o",
                       tmp_path / "q", "--exclude", "*txt_*", "-q")
    assert code == 0
    ck = Checkpoint(tmp_path / "q")
    assert ck.layers["double_blocks.0.txt_attn.qkv"].format == "bf16"
    assert ck.layers["double_blocks.0.img_attn.qkv"].format == "nvfp4"


def test_errors_go_to_stderr_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"nope")
    code, out, err = run(capsys, "inspect", bad)
    assert code == 2 and out == "" and str(bad) in err and "error" in err


def test_synth_then_existing_output_refused(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert run(capsys, "synth", out, "--arch", "flux2", "-q")[0] == 0
    code, _, err = run(capsys, "synth", out, "-q")
    assert code == 2 and "exists" in err


BOOTSTRAP = ("import sys; sys.path.insert(0, 'scripts'); from _bootstrap import ensure_package; ensure_package(); "
             "from comfyui_nvfp4.quant.cli import main; sys.exit(main())")


@pytest.mark.parametrize("how", ["entry point", "checkout"])
def test_help(how):
    """`nvfp4 --help` as installed by pip, and from a bare checkout (no install)."""
    root = Path(__file__).resolve().parents[1]
    if how == "entry point":
        # pip puts the entry point beside the interpreter (a venv's bin/, on PATH or not)
        exe = shutil.which("nvfp4", path=str(Path(sys.executable).parent)) or shutil.which("nvfp4")
        if exe is None:
            pytest.skip("package not installed with pip here (scripts/test.sh installs it)")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-c", BOOTSTRAP]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0
    for word in ("inspect", "verify", "convert", "quantize", "modelopt", "comfy"):
        assert word in r.stdout
