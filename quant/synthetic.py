"""Seeded synthetic FLUX checkpoints (bf16), for tests, demos and benchmarks."""
from __future__ import annotations

import torch

from . import names
from .layers import DenseLinear
from .shapes import FluxDims, linear_shapes, param_shapes
from .writer import DENSE, write_checkpoint


def synthetic_layers(dims: FluxDims, seed: int = 0, dtype=torch.bfloat16):
    """(layers, params): random Gaussian weights with std 1/sqrt(K), small biases (FLUX.1 only)."""
    g = torch.Generator().manual_seed(seed)
    bias = dims.architecture == names.FLUX1
    layers = {}
    for name, (n, k) in linear_shapes(dims).items():
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        b = (torch.randn(n, generator=g) * 0.02).to(dtype) if bias else None
        layers[name] = DenseLinear(w, b)
    params = {k: (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype) for k, shape in param_shapes(dims).items()}
    return layers, params


def write_synthetic(out, dims: FluxDims, *, naming: str = names.BFL, seed: int = 0, overwrite: bool = False):
    layers, params = synthetic_layers(dims, seed)
    return write_checkpoint(out, dims.architecture, layers.items(), params, flavour=DENSE, naming=naming,
                            overwrite=overwrite)
