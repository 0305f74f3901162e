"""Host tests: a real ComfyUI (COMFYUI_PATH) started per session with this plugin installed."""
import sys
from pathlib import Path

import pytest
import torch

from comfyui_nvfp4.quant import Checkpoint, names, quantize_checkpoint
from comfyui_nvfp4.quant.layers import DenseLinear
from comfyui_nvfp4.quant.shapes import FluxDims
from comfyui_nvfp4.quant.synthetic import write_synthetic
from comfyui_nvfp4.quant.writer import write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from comfy_driver import ENV_VAR, ComfyServer, comfyui_path

pytestmark = pytest.mark.host


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is None:
        skip = pytest.mark.skip(reason=f"no ComfyUI: set {ENV_VAR} to a ComfyUI checkout (tested on v0.30.0, "
                                       f"commit 6db4fa2) to run the host tests")
        for item in items:
            if "host" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI imported into this process, on the CPU (the in-process host tests)."""
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    return path


def dequantized_reference(src, out, dtype=torch.float32):
    """A plain checkpoint holding exactly the dequantized weights of `src` (BFL names).

    float32, because e2m1 * e4m3 * weight_scale_2 is exact only there: a bf16 file would round
    every weight once more than the dequant path (which dequantizes in the compute dtype, fp32
    on the CPU) and add about 1e-3 of difference by itself."""
    ck = Checkpoint(src)
    layers = []
    for n in ck.layers:
        layer = ck.load_linear(n)  # read once
        layers.append((n, DenseLinear(layer.dequantize(dtype), None if layer.bias is None else layer.bias.to(dtype))))
    params = {k: ck.load_param(k) for k in ck.params}
    write_checkpoint(out, ck.architecture, layers, params, flavour="bf16", naming=names.BFL, overwrite=True)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models" / "diffusion_models"
    models.mkdir(parents=True)
    for arch in (names.FLUX1, names.FLUX2):
        dims = FluxDims.tiny(arch, depth=1, depth_single=1)
        bf = models / f"{arch}_bf16.safetensors"
        write_synthetic(bf, dims, seed=3)
        quantize_checkpoint(bf, "comfy", models / f"{arch}_comfy.safetensors", progress=False)
        write_synthetic(base / f"{arch}_bf16_diffusers", dims, naming=names.DIFFUSERS, seed=3)
        quantize_checkpoint(base / f"{arch}_bf16_diffusers", "modelopt", models / f"{arch}_modelopt",
                            progress=False)
        for flavour in ("comfy", "modelopt"):
            src = models / (f"{arch}_{flavour}.safetensors" if flavour == "comfy" else f"{arch}_{flavour}")
            dequantized_reference(src, models / f"{arch}_{flavour}_dequant_ref.safetensors")
    (models / "broken.safetensors").write_bytes((models / "flux1_comfy.safetensors").read_bytes()[:-5000])
    return base


def server_args() -> list[str]:
    """NVFP4_HOST_SERVER_ARGS, else ComfyUI's defaults on a CUDA machine and --cpu elsewhere."""
    import os
    if os.environ.get("NVFP4_HOST_SERVER_ARGS") is not None:
        return os.environ["NVFP4_HOST_SERVER_ARGS"].split()
    return [] if torch.cuda.is_available() else ["--cpu"]


@pytest.fixture(scope="session")
def server(base_dir):
    s = ComfyServer(base_dir, server_args())
    yield s
    s.stop()


def start_server(base_dir, args):
    return ComfyServer(base_dir, args)
