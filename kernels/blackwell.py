"""Blackwell backends: FlashInfer `mm_fp4` with backend cudnn, cutlass or trtllm.

Never run here (no Blackwell GPU on our machines): correctness rests on the layout code in
blackwell_layout.py, checked on the CPU by independent read-back in tests/, and on calling
mm_fp4 exactly per its documented contract:
  a          = fp4_quantize(x, 1/input_scale) packed activations [M, Kp/2] (128x4 scales)
  b          = W.T, the column-major view of the contiguous prepared weight [Np, Kp/2]
  b_descale  = W_sf.T, the view of the prepared (swizzled) scales [Rp, Cp]
  alpha      = one-element fp32 tensor input_scale * weight_scale_2
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
from contextlib import contextmanager

import torch

from .act_quant import activation_scale
from .blackwell_layout import CUDNN, CUTLASS, TRTLLM, padded_dims, prepare_weight
from .portable import bias_of
from .registry import Backend, register
from .versions import release

# FlashInfer's requirement decorators (flashinfer 0.7.2 gemm_base.py), as compute capability ints.
SUPPORTED_CC = {CUDNN: {100, 103, 107, 110, 120, 121}, CUTLASS: {100, 103, 107, 110, 120, 121},
                TRTLLM: {100, 103, 107}}
MIN_CUDNN_BACKEND = 91002          # cuDNN 9.10.2
MIN_CUDNN_FRONTEND = (1, 13)


class FlashInferOps:
    """The two FlashInfer entry points we call, resolved on first use."""

    def __init__(self):
        self._mod = None

    def _fi(self):
        if self._mod is None:
            self._mod = importlib.import_module("flashinfer")
        return self._mod

    def fp4_quantize(self, x, global_sf):
        return self._fi().fp4_quantize(x, global_sf, 16, False, True)

    def mm_fp4(self, a, b, a_descale, b_descale, alpha, out_dtype, backend):
        return self._fi().mm_fp4(a, b, a_descale, b_descale, alpha, out_dtype, backend=backend)


_OPS = FlashInferOps()


@contextmanager
def flashinfer_tuning(cache_file, tune: bool):
    """FlashInfer's own autotuner around mm_fp4 calls: with tune=True it profiles each GEMM's
    tactics (kernel configs) on first use and saves them to `cache_file`; with tune=False it
    loads the saved tactics. No-op where FlashInfer is not installed."""
    if importlib.util.find_spec("flashinfer") is None:
        yield
        return
    import flashinfer
    with flashinfer.autotune(tune, cache=str(cache_file)):
        yield


@contextmanager
def use_ops(ops):
    """Swap the FlashInfer entry points (the CPU read-back emulator in the tests uses this)."""
    global _OPS
    old, _OPS = _OPS, ops
    try:
        yield
    finally:
        _OPS = old


def _has_jit_toolchain() -> tuple[bool, str]:
    """fp4_quantize (and the cutlass GEMM) are JIT-compiled unless a jit cache is installed."""
    if importlib.util.find_spec("flashinfer_jit_cache") is not None:
        return True, ""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True, ""
    return False, "needs nvcc (CUDA toolkit) or the flashinfer-jit-cache package to build its kernels"


def _cubins_available() -> tuple[bool, str]:
    try:
        fi_v = importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        fi_v = None
    try:
        cubin_v = importlib.metadata.version("flashinfer-cubin")
    except importlib.metadata.PackageNotFoundError:
        cubin_v = None
    if cubin_v is not None and fi_v is not None and release(cubin_v) == release(fi_v):
        return True, ""
    if os.environ.get("NVFP4_ALLOW_CUBIN_DOWNLOAD") == "1":
        return True, ""
    return False, (f"trtllm kernels are cubins: install flashinfer-cubin=={fi_v or '<flashinfer version>'} "
                   f"(found {cubin_v or 'none'}), or set NVFP4_ALLOW_CUBIN_DOWNLOAD=1 to let FlashInfer "
                   f"download them at first use")


def _cudnn_ok() -> tuple[bool, str]:
    try:
        import cudnn  # nvidia-cudnn-frontend
    except ImportError:
        return False, "needs nvidia-cudnn-frontend >= 1.13 (pip install nvidia-cudnn-frontend)"
    fe = release(getattr(cudnn, "__version__", "0"))
    if fe[:2] < MIN_CUDNN_FRONTEND:
        return False, f"needs cudnn-frontend >= 1.13, found {cudnn.__version__}"
    try:
        be = int(cudnn.backend_version())
    except Exception as e:
        return False, f"cuDNN library not usable: {e!r}"
    if be < MIN_CUDNN_BACKEND:
        return False, f"needs cuDNN >= 9.10.2, found {be}"
    return True, ""


class MMFP4Backend(Backend):
    flashinfer_backend = ""
    prepares = True
    replaces = ("packed", "scale")  # the prepared weight and swizzled scales stand in for them
    # FlashInfer's runners and autotuner are not documented as thread-safe: one layer at a time
    parallel_prepare = False

    def __init__(self, fb: str, priority: int):
        self.flashinfer_backend = fb
        self.name = fb
        self.priority = priority
        self.label = f"{fb}: FlashInfer mm_fp4 (Blackwell FP4 tensor cores)"

    def capability(self, device):
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, "needs a Blackwell CUDA GPU"
        major, minor = torch.cuda.get_device_capability(device)
        cc = major * 10 + minor
        if cc not in SUPPORTED_CC[self.name]:
            allowed = ", ".join(f"{c // 10}.{c % 10}" for c in sorted(SUPPORTED_CC[self.name]))
            return False, f"FlashInfer {self.name} FP4 GEMM runs on compute capability {allowed}, not {major}.{minor}"
        if importlib.util.find_spec("flashinfer") is None:
            return False, "flashinfer-python is not installed (pip install 'comfyui-nvfp4[blackwell]')"
        ok, why = _has_jit_toolchain()
        if not ok:
            return False, why
        if self.name == CUDNN:
            return _cudnn_ok()
        if self.name == TRTLLM:
            return _cubins_available()
        return True, ""

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FlashInfer mm_fp4 outputs bf16 or fp16, the model computes in {dtype}: "
                             f"set the loader's compute_dtype to bf16")
        if self.name == TRTLLM and dtype != torch.bfloat16:
            raise ValueError("the trtllm FP4 GEMM outputs bf16 only; the model computes in fp16: "
                             "set the loader's compute_dtype to bf16 or pick cudnn/cutlass")

    def prepare(self, module) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(module.stored_parts()):
            prepared = prepare_weight(self.name, p.packed, p.block_scale)
            out[f"w{i}"] = prepared["weight"]
            out[f"s{i}"] = prepared["scale"]
        return out

    def gemm_args(self, module, x2d: torch.Tensor, part: int):
        """Exactly what mm_fp4 receives for one part of the layer (also used by the tests)."""
        # only the part's scalars are read: its codes and block scales are the prepared layout
        n, k = module.part_shape(part)
        global_scale = module.t(f"gscale_{part}", x2d.device)
        np_, kp = padded_dims(self.name, n, k)
        if kp != k:
            x2d = torch.nn.functional.pad(x2d, (0, kp - k))
        in_scale = activation_scale(x2d, module.t(f"iscale_{part}", x2d.device))
        a, a_sf = _OPS.fp4_quantize(x2d.contiguous(), (1.0 / in_scale).reshape(1))
        w = module.prep(self.name, f"w{part}", x2d.device)
        s = module.prep(self.name, f"s{part}", x2d.device)
        rp, cp = s.shape
        b = w.t()                                   # [Kp/2, Np], column-major view
        b_descale = s.view(torch.float8_e4m3fn).t()  # [Cp, Rp]
        alpha = (in_scale * global_scale.float()).reshape(1).to(torch.float32)
        return dict(a=a, b=b, a_descale=a_sf, b_descale=b_descale, alpha=alpha), n

    def run(self, module, x):
        self.check_dtype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        outs = []
        for i in range(module.n_parts):
            args, n = self.gemm_args(module, x2, i)
            y = _OPS.mm_fp4(args["a"], args["b"], args["a_descale"], args["b_descale"], args["alpha"],
                            x.dtype, self.flashinfer_backend)
            outs.append(y[:, :n])
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        b = bias_of(module, x)
        if b is not None:
            y = y + b
        module.last_path = self.name
        return y.reshape(*x.shape[:-1], -1)


CUDNN_BACKEND = register(MMFP4Backend(CUDNN, 100))
CUTLASS_BACKEND = register(MMFP4Backend(CUTLASS, 99))
TRTLLM_BACKEND = register(MMFP4Backend(TRTLLM, 98))
