"""ComfyUI-NVFP4: run NVFP4 FLUX checkpoints in ComfyUI (package root = the custom node).

Importing this package outside ComfyUI works (the `nvfp4` CLI and the tests do it); the
nodes are registered only when ComfyUI's node API is importable.
"""
WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside a ComfyUI process)
    _IN_COMFYUI = True
except ImportError:
    _IN_COMFYUI = False

if _IN_COMFYUI:
    from .nodes.nodes_v3 import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"] if _IN_COMFYUI else ["WEB_DIRECTORY"]
