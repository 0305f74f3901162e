"""Backends that run anywhere torch runs: `dequant` (weight-only) and `emulate` (W4A4 numerics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .act_quant import fake_quantize
from .registry import Backend, register


def bias_of(module, x: torch.Tensor) -> torch.Tensor | None:
    b = module.t("bias", x.device)
    return None if b is None else b.to(x.dtype)


def dequant_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight [N, K] times its per-tensor (scalar) or per-channel ([N]) scale, in `dtype`."""
    return w8.to(dtype) * scale.to(dtype).reshape(-1, 1)


def fp8_dequant_linear(module, x: torch.Tensor) -> torch.Tensor:
    """FP8 layers of "mixed" files: per-tensor dequantize in the compute dtype, whatever the backend."""
    w = dequant_fp8(module.t("weight", x.device), module.t("weight_scale", x.device), x.dtype)
    module.last_path = "fp8-dequant"
    return F.linear(x, w, bias_of(module, x))


class Dequant(Backend):
    name = "dequant"
    label = "dequant: weight-only, dequantize per forward (any device)"
    priority = 10

    def run(self, module, x):
        w = torch.cat([p.dequantize(x.dtype) for p in module.parts(x.device)])
        module.last_path = self.name
        return F.linear(x, w, bias_of(module, x))


class Emulate(Backend):
    name = "emulate"
    label = "emulate: NVFP4 weights and activations, Blackwell numerics in plain torch (accuracy checks)"
    priority = 0
    auto_eligible = False

    def run(self, module, x):
        x2 = x.reshape(-1, x.shape[-1])
        outs = [fake_quantize(x2, p.input_scale) @ p.dequantize(torch.float32).t()
                for p in module.parts(x.device)]
        y = torch.cat(outs, dim=-1).to(x.dtype).reshape(*x.shape[:-1], -1)
        b = bias_of(module, x)
        module.last_path = self.name
        return y if b is None else y + b


DEQUANT = register(Dequant())
EMULATE = register(Emulate())
