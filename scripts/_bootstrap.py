"""Make `comfyui_nvfp4` importable from a plain checkout (no pip install needed)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_package():
    try:
        import comfyui_nvfp4  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("comfyui_nvfp4", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_nvfp4"] = mod
    spec.loader.exec_module(mod)
