"""Typed errors for checkpoint problems.

Every error names the file, the tensor (when there is one) and what was expected
versus what was found, so a user can act on the message alone.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or is not what it claims to be."""

    def __init__(self, message: str, *, path=None, tensor: str | None = None,
                 expected=None, found=None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.expected = expected
        self.found = found
        parts = [message]
        if self.path is not None:
            parts.append(f"file: {self.path}")
        if tensor is not None:
            parts.append(f"tensor: {tensor}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if found is not None:
            parts.append(f"found: {found}")
        super().__init__("; ".join(parts))


class TruncatedFileError(CheckpointError):
    """The safetensors file ends before its header says it should."""


class NotFluxError(CheckpointError):
    """The checkpoint does not hold a FLUX.1 or FLUX.2 diffusion transformer."""


class UnknownFlavourError(CheckpointError):
    """Neither config, metadata nor a user override says how the NVFP4 tensors are laid out."""


class MissingTensorError(CheckpointError):
    """A tensor the layer's format requires is absent (e.g. weight_scale_2)."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape does not match what its layer's format and shape require."""


class DTypeMismatchError(CheckpointError):
    """A tensor has the wrong dtype for its role."""


class BadScaleError(CheckpointError):
    """A scale is NaN, infinite, zero or negative where that cannot be right."""


class UnsupportedShapeError(CheckpointError):
    """A layer cannot be NVFP4 at all (e.g. K not a multiple of 16)."""
