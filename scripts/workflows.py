"""API-format prompts for the host tests and the demo (no text encoder, no VAE download)."""
from __future__ import annotations


def nvfp4_prompt(ckpt: str, backend: str = "auto", arch: str = "flux1", steps: int = 3, seed: int = 7,
                 size: int = 64, prefix: str = "nvfp4_test", loader: str = "nvfp4", dtype: str = "auto") -> dict:
    """Load -> backend -> demo conditioning -> KSampler -> SaveLatent.

    loader="core" loads `ckpt` with ComfyUI's own UNETLoader instead (the bf16 reference)."""
    latent = ({"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
              if arch == "flux1" else
              {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}})
    p = {
        "3": {"class_type": "NVFP4DemoConditioning", "inputs": {"model": ["2", 0], "tokens": 8, "seed": 1}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": latent,
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    if loader == "nvfp4":
        p["1"] = {"class_type": "NVFP4ModelLoader", "inputs": {"ckpt_name": ckpt, "compute_dtype": dtype}}
        p["2"] = {"class_type": "NVFP4Backend", "inputs": {"model": ["1", 0], "backend": backend}}
    else:
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": ckpt, "weight_dtype": "default"}}
        for node in p.values():
            for k, v in node["inputs"].items():
                if v == ["2", 0]:
                    node["inputs"][k] = ["1", 0]
    return p
