"""ComfyUI's memory modes on a CUDA GPU: the default dynamic-VRAM patcher, the legacy patcher,
--lowvram and --novram. Each runs the same prompts (two backends, twice each: unload and reload
across prompts) and must give the default mode's latents."""
import pytest
import torch
from safetensors.torch import load_file

from comfy_driver import ComfyServer
from workflows import nvfp4_prompt

MODES = [[], ["--disable-dynamic-vram"], ["--lowvram"], ["--novram"]]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: ComfyUI refuses --lowvram/--novram together with --cpu")


def latent(server, result):
    out = result["history"]["outputs"]["7"]["latents"][0]
    return load_file(str(server.base / "output" / out.get("subfolder", "") / out["filename"]))["latent_tensor"].float()


@pytest.fixture(scope="module")
def results(base_dir):
    seen = {}
    for args in MODES:
        s = ComfyServer(base_dir, args)
        try:
            for backend in ("dequant", "fp8", "dequant", "fp8"):
                r = s.run(nvfp4_prompt("flux1_modelopt", backend, prefix=f"vram_{'_'.join(args) or 'default'}_{backend}"))
                assert r["status"] == "success", (args, backend, r["errors"], s.log_text()[-3000:])
                seen.setdefault(" ".join(args) or "default", []).append((backend, latent(s, r),
                                                                        s.progress_texts(r["messages"], "2")[-1]))
        finally:
            s.stop()
    return seen


@pytest.mark.parametrize("mode", [" ".join(a) or "default" for a in MODES])
def test_mode_matches_default(results, mode):
    ref = {b: lat for b, lat, _ in results["default"][:2]}
    for backend, lat, text in results[mode]:
        assert backend in text, text  # the path summary names the backend it ran
        err = float((lat - ref[backend]).norm() / ref[backend].norm())
        assert err < 1e-2, (mode, backend, err)
