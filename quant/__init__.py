"""NVFP4 format and FLUX checkpoints: pure torch + safetensors, no ComfyUI import."""
from .convert import convert_checkpoint, quantize_checkpoint
from .errors import CheckpointError
from .layers import BF16, FP8, NVFP4, DenseLinear, FP8Linear, NVFP4Linear
from .nvfp4 import NVFP4Weight, dequantize, quantize
from .reader import COMFY, DENSE, MODELOPT, Checkpoint, open_checkpoint
from .shapes import FluxDims
from .verify import verify_checkpoint

__all__ = [
    "BF16", "COMFY", "DENSE", "FP8", "MODELOPT", "NVFP4", "Checkpoint", "CheckpointError", "DenseLinear",
    "FP8Linear", "FluxDims", "NVFP4Linear", "NVFP4Weight", "convert_checkpoint", "dequantize",
    "open_checkpoint", "quantize", "quantize_checkpoint", "verify_checkpoint",
]
