"""ComfyUI-NVFP4: run NVFP4 FLUX checkpoints in ComfyUI (package root = the custom node).

Importing this package outside ComfyUI works (the CLI and tests do it); the nodes are
registered only when ComfyUI's API is importable.
"""
