"""ComfyUI nodes. Pure helpers (model_files, path_report) import without ComfyUI; the node
classes themselves (nodes_v3) need ComfyUI's API and are imported only inside the host."""
