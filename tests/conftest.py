import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, our Triton kernels run under Triton's interpreter (tests/test_triton_interpreter.py).
# Triton reads this when a kernel is decorated, so it is set before any plugin module is imported.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the plugin as `comfyui_nvfp4` (its installed name). Without an install,
# register the repository root under that name so a bare checkout runs too.
try:
    import comfyui_nvfp4  # noqa: F401
except ImportError:
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("comfyui_nvfp4", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_nvfp4"] = mod
    spec.loader.exec_module(mod)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_nvfp4.quant import names  # noqa: E402
from comfyui_nvfp4.quant.convert import quantize_checkpoint  # noqa: E402
from comfyui_nvfp4.quant.shapes import FluxDims  # noqa: E402
from comfyui_nvfp4.quant.synthetic import write_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Seeded tiny FLUX.1 and FLUX.2 checkpoints: bf16 sources and both NVFP4 flavours."""
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for arch in (names.FLUX1, names.FLUX2):
        dims = FluxDims.tiny(arch, depth=2, depth_single=2)
        bf = d / f"{arch}_bf16.safetensors"
        write_synthetic(bf, dims, naming=names.BFL, seed=1)
        bfd = d / f"{arch}_bf16_diffusers"
        write_synthetic(bfd, dims, naming=names.DIFFUSERS, seed=1)
        out[arch, "bf16"] = bf
        out[arch, "bf16_diffusers"] = bfd
        out[arch, "comfy"] = d / f"{arch}_comfy.safetensors"
        quantize_checkpoint(bf, "comfy", out[arch, "comfy"], progress=False)
        out[arch, "modelopt"] = d / f"{arch}_modelopt"
        quantize_checkpoint(bfd, "modelopt", out[arch, "modelopt"], progress=False)
    return out
