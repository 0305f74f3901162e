"""Fast paths for CUDA GPUs without FP4 tensor cores (Hopper, Ada, Ampere).

fp8   (SM89+): each NVFP4 layer becomes FP8 e4m3 with one scale per output channel at
       preparation time (one Triton pass per part on the GPU, layer by layer); at run time
       activations are quantized per token in one Triton pass and torch._scaled_mm (rowwise
       scales, bias fused) does the GEMM; M <= 16 runs a Triton kernel streaming the FP8
       weights instead (path "fp8-gemv"). Parts with different weight_scale_2 fold into the
       per-channel scales, so a fused layer is one GEMM.
w4a16 (SM80+): weights stay resident at 4.5 bits (the packed FP4 codes + e4m3 scales). M <= 16:
       a Triton kernel decodes them in registers (path "w4a16"); larger M, where the GEMM is
       compute-bound, decodes the layer into a transient bf16 weight in one Triton pass and
       multiplies with cuBLAS (path "w4a16-dq", the dequantize-then-GEMM split vLLM's AWQ uses).
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from .portable import bias_of, dequant_fp8
from .registry import Backend, KernelsAhead, register
from .transfer import to_device
from .versions import release
from .w4a16_layout import SUPER, w4a16_pack

log = logging.getLogger("comfyui_nvfp4")
FP8_MAX = 448.0
# cuBLASLt rejects some rowwise-scaled FP8 GEMMs with CUBLAS_STATUS_NOT_SUPPORTED (H100, torch
# 2.11 + CUDA 13): M = 17..32 with K = 12288 / 15360 and N = 3072, which runs from M = 64 (such
# M are padded), and in tests/gpu smaller N (512 / 1024) at those K even padded. Shapes it
# rejects run "fp8-dq" (the FP8 weights dequantized to bf16, cuBLAS bf16), remembered per shape
# and logged once.
SCALED_MM_MIN_M = 64
_SCALED_MM_REJECTED: set[tuple[int, int, int]] = set()


def scaled_mm_shape_ok(n: int, k: int) -> bool:
    """torch._scaled_mm's rule on CUDA (a RuntimeError otherwise): N and K multiples of 16."""
    return n % 16 == 0 and k % 16 == 0


def _gemm_key(m: int, w: torch.Tensor) -> tuple[int, int, int]:
    """(M as padded for cuBLASLt, N, K): what _SCALED_MM_REJECTED remembers."""
    return max(m, SCALED_MM_MIN_M), w.shape[0], w.shape[1]


def _rejected(key: tuple[int, int, int]) -> bool:
    """Whether torch._scaled_mm cannot take the GEMM of `key` (_gemm_key): a shape cuBLASLt
    refused, or a layer whose N or K breaks the multiple-of-16 rule, which holds for every M (so
    it is remembered and logged once per layer shape, as (0, N, K), not once per M)."""
    if key in _SCALED_MM_REJECTED:
        return True
    _, n, k = key
    if scaled_mm_shape_ok(n, k):
        return False
    if (0, n, k) not in _SCALED_MM_REJECTED:
        _SCALED_MM_REJECTED.add((0, n, k))
        log.warning("NVFP4 fp8: torch._scaled_mm needs N and K multiples of 16, this layer is N=%d K=%d; "
                    "it runs 'fp8-dq' (FP8 weights dequantized, bf16 GEMM)", n, k)
    return True


def _cuda_cc_below(device, minimum: tuple[int, int], no_gpu: str, too_old: str) -> str | None:
    """Why `device` is not a CUDA GPU of compute capability >= minimum (None when it is)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return no_gpu
    cc = torch.cuda.get_device_capability(device)
    return f"{too_old}, this GPU is {cc[0]}.{cc[1]}" if cc < minimum else None


# The oldest Triton our kernels compile with: every kernel variant preparation and sampling
# launch compiled for sm_80 / sm_86 / sm_89 / sm_90 with every Triton from 3.3 to 3.9 (offline,
# eleventh session); CI compiles them with its own Triton (tests/test_triton_compiles.py).
TRITON_MIN = (3, 3)


def _triton_ok(version: str | None = None) -> tuple[bool, str]:
    """Whether our Triton kernels can run here: Triton installed and at least TRITON_MIN
    (`version`: this install's, read when not given; pre-release and vendor suffixes such as
    3.3.1.post19 of triton-windows are ignored)."""
    if version is None:
        if importlib.util.find_spec("triton") is None:
            return False, "needs Triton (it ships with PyTorch's CUDA wheels on Linux)"
        import triton
        version = triton.__version__
    if release(version)[:2] < TRITON_MIN:
        return False, (f"needs Triton >= {TRITON_MIN[0]}.{TRITON_MIN[1]}, this install has {version} "
                       "(PyTorch >= 2.7 ships it)")
    return True, ""


# Per-channel scale candidates, as fractions of amax/448. Dequantized NVFP4 values (e2m1 * e4m3,
# up to 6 significant bits) round to e4m3's 4 bits; shrinking the scale by k/16 lines more of
# them up with the e4m3 grid. Picking the best of 8 per row cut the weight error from 2.8% to
# 2.2% (GEMM error 3.9% -> 3.5%) on NVFP4-quantized Gaussian weights.
SCALE_CANDIDATES = tuple(1.0 - i / 16 for i in range(8))


def _compute_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fp8_weight(parts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 parts -> (fp8 e4m3 [N, K], fp32 per-channel scales [N]) in plain torch on `device`:
    the reference the Triton conversion is tested against (and the path without a GPU).

    Each row takes the candidate scale with the smallest squared rounding error."""
    w = torch.cat([p.dequantize(torch.float32, device) for p in parts])
    amax = w.abs().amax(dim=1, keepdim=True)
    base = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    best_q = best_s = best_e = None
    for ratio in SCALE_CANDIDATES:
        s = base * ratio
        q = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        e = (q.float().mul_(s).sub_(w)).square_().sum(dim=1, keepdim=True)
        if best_q is None:
            best_q, best_s, best_e = q, s, e
        else:
            better = e < best_e
            best_q = torch.where(better, q, best_q)
            best_s = torch.where(better, s, best_s)
            best_e = torch.minimum(e, best_e)
    return best_q, best_s.reshape(-1)


class FP8Backend(Backend):
    name = "fp8"
    label = "fp8: NVFP4 -> FP8 weights, per-token FP8 activations, torch._scaled_mm (SM89+)"
    priority = 50
    prepares = True
    replaces = ("packed", "scale")  # FP8 weights + per-channel scales replace the NVFP4 ones
    # cuBLAS fast (non-promoting) FP8 accumulation: on the H100 it took the FLUX.1-dev GEMMs from
    # 1.32x to 1.58x bf16 (geomean) with the same error (3.44% both): see BENCHMARKS.md.
    fast_accum = True

    def capability(self, device):
        why = _cuda_cc_below(device, (8, 9), "needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or 9.x)",
                             "FP8 tensor cores need compute capability 8.9+")
        if why:
            return False, why
        if not hasattr(torch, "_scaled_mm"):
            return False, "this PyTorch has no torch._scaled_mm"
        return _triton_ok()

    def prepare(self, module):
        """On the GPU (where the self-check then runs); preparation stores the result next to
        the module's other parameters."""
        dev = _compute_device()
        parts = module.stored_parts()
        if dev.type != "cuda":
            q, scale = fp8_weight(parts, dev)
            return {"w": q, "ws": scale}
        from .triton_fp8 import nvfp4_to_fp8
        q = torch.empty((module.out_features, module.in_features), device=dev, dtype=torch.float8_e4m3fn)
        scale = torch.empty(module.out_features, device=dev, dtype=torch.float32)
        row = 0
        for p in parts:
            n = p.packed.shape[0]
            nvfp4_to_fp8(to_device(p.packed, dev), to_device(p.block_scale, dev), p.global_scale.to(dev),
                         q[row:row + n], scale[row:row + n])
            row += n
        return {"w": q, "ws": scale}

    def compile_ahead(self, modules, device):
        """The conversion, activation quantization and untuned one-row GEMV variants of every layer
        shape (what preparation and its self-check run), compiled in the background."""
        if device.type != "cuda":
            return KernelsAhead()  # preparation converts with torch there
        from . import triton_fp8
        from .compile_ahead import TritonKernelsAhead
        from .preparation import SELF_CHECK_ROWS
        return TritonKernelsAhead(self.name, modules,
                                  lambda shape: triton_fp8.preparation_launches(shape, SELF_CHECK_ROWS), device)

    def run(self, module, x):
        from . import triton_fp8
        x2 = x.reshape(-1, x.shape[-1])
        w = module.prep(self.name, "w", x.device)
        ws = module.prep(self.name, "ws", x.device)
        b = bias_of(module, x)
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        b = None if b is None else b.to(out_dtype)
        if x2.shape[0] <= triton_fp8.SMALL_M_MAX:
            # cuBLAS's FP8 GEMM is slow at small M (0.19 ms vs bf16's 0.05 at M=1 on 3072x18432,
            # H100): stream the same FP8 weights once (bf16 activations, no quantization).
            y = triton_fp8.small_m_gemm(x2, w, ws, b, out_dtype)
            module.last_path = "fp8-gemv"
        else:
            y = self._scaled_mm(x2, w, ws, b, out_dtype)
            if y is None:
                y = torch.nn.functional.linear(x2.to(out_dtype), dequant_fp8(w, ws, out_dtype), b)
                module.last_path = "fp8-dq"
            else:
                module.last_path = self.name
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _scaled_mm(self, x2, w, ws, b, out_dtype):
        """Per-token FP8 activations x FP8 weights on cuBLASLt; None where cuBLASLt rejects the shape."""
        from .triton_fp8 import act_quant_fp8
        if _rejected(_gemm_key(x2.shape[0], w)):  # skip quantizing for nothing
            return None
        q, xs = act_quant_fp8(x2)
        return self.gemm_quantized(q, xs, w, ws, b, out_dtype)

    def gemm_quantized(self, q, xs, w, ws, b, out_dtype):
        """(fp8 [M, K], fp32 row scales [M, 1]) x FP8 weights -> [M, N] on cuBLASLt, bias fused;
        None where cuBLASLt rejects the shape (logged once per shape)."""
        m = q.shape[0]
        key = _gemm_key(m, w)
        if _rejected(key):
            return None
        mp = key[0]
        if m < mp:
            q = torch.cat([q, q.new_zeros(mp - m, q.shape[1])])
            xs = torch.cat([xs, xs.new_ones(mp - m, 1)])
        try:
            y = torch._scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=b, out_dtype=out_dtype,
                                 use_fast_accum=self.fast_accum)
            return y if m == mp else y[:m]
        except RuntimeError as e:
            if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(e):
                raise
            _SCALED_MM_REJECTED.add(key)
            log.warning("NVFP4 fp8: cuBLASLt has no rowwise FP8 GEMM for M=%d N=%d K=%d; such layers run "
                        "'fp8-dq' (FP8 weights dequantized, bf16 GEMM)", *key)
            return None

    def run_quantized(self, module, q, xs, out_dtype):
        """The layer on activations already quantized per token (the fused blocks' kernels made
        them): [M, K] fp8 + [M, 1] scales -> [M, N] in out_dtype. Records the path taken."""
        w = module.prep(self.name, "w", q.device)
        ws = module.prep(self.name, "ws", q.device)
        b = module.t("bias", q.device)
        if b is not None and b.dtype != out_dtype:
            b = b.to(out_dtype)
        y = self.gemm_quantized(q, xs, w, ws, b, out_dtype)
        if y is None:
            x = (q.to(torch.float32) * xs).to(out_dtype)
            y = torch.nn.functional.linear(x, dequant_fp8(w, ws, out_dtype), b)
            module.last_path = "fp8-dq"
        else:
            module.last_path = "fp8-fused"
        return y


class W4A16Backend(Backend):
    name = "w4a16"
    label = "w4a16: 4-bit weights; Triton decoding in registers for M <= 16, one-pass decode + cuBLAS above (SM80+)"
    priority = 40
    prepares = True
    replaces = ("packed", "scale")  # by the w4a16 codes and re-encoded scales: same sizes, rows padded to 32

    def capability(self, device):
        why = _cuda_cc_below(device, (8, 0), "needs a CUDA GPU (compute capability 8.0+)",
                             "needs compute capability 8.0+ (bf16 tensor cores)")
        return (False, why) if why else _triton_ok()

    def prepare(self, module):
        """The w4a16 layout of each part's codes and scales, made on the compute device (it replaces
        the canonical ones there). Layers whose K is not a multiple of 128 get nothing and run
        `dequant` (reported)."""
        if module.in_features % SUPER:
            return {}
        dev = _compute_device()
        if dev.type == "cuda":
            from .triton_w4a16 import pack  # one kernel per part; the torch reference takes ~30 ops
        else:
            pack = w4a16_pack
        out = {}
        for i, p in enumerate(module.stored_parts()):
            try:
                out[f"w{i}"], out[f"s{i}"] = pack(to_device(p.packed, dev), to_device(p.block_scale, dev))
            except ValueError as e:
                raise ValueError(f"NVFP4 w4a16: layer {module.layer_name} part {i}: {e}") from None
        return out

    def compile_ahead(self, modules, device):
        """The pack, decode and one-row small-M variants of every layer shape (the self-check runs
        the last two; sampling runs them too), compiled in the background."""
        if device.type != "cuda":
            return KernelsAhead()  # the CPU interpreter compiles nothing
        from . import triton_w4a16
        from .compile_ahead import TritonKernelsAhead
        return TritonKernelsAhead(self.name, modules, lambda shape: triton_w4a16.preparation_launches(shape, device),
                                  device, needs=lambda shape: shape.k % SUPER == 0)

    def run(self, module, x):
        if module.in_features % SUPER:
            from .portable import DEQUANT
            return DEQUANT.run(module, x)
        from . import triton_w4a16
        x2 = x.reshape(-1, x.shape[-1])
        b = bias_of(module, x)
        dev = x.device
        # (codes, scales, global scale, the part's rows: its w4a16 tensors are padded to whole tiles)
        parts = [(module.prep(self.name, f"w{i}", dev), module.prep(self.name, f"s{i}", dev),
                  module.t(f"gscale_{i}", dev), module.part_shape(i)[0]) for i in range(module.n_parts)]
        if x2.shape[0] <= triton_w4a16.SMALL_M_MAX:
            out = torch.empty((x2.shape[0], module.out_features), device=x.device, dtype=torch.bfloat16)
            if b is not None and b.dtype != torch.bfloat16:
                b = b.to(torch.bfloat16)
            if len(parts) == 1:  # most layers: no slicing (each view costs host time at M = 1)
                c, scale, gscale, _ = parts[0]
                triton_w4a16.small_m_gemm(x2, c, scale, gscale, b, out)
            else:
                col = 0
                for c, scale, gscale, n in parts:
                    triton_w4a16.small_m_gemm(x2, c, scale, gscale, None if b is None else b[col:col + n],
                                              out[:, col:col + n])
                    col += n
            module.last_path = self.name
            return (out if x.dtype == torch.bfloat16 else out.to(x.dtype)).reshape(*x.shape[:-1], -1)
        # Compute-bound: decode into a transient weight (one layer at a time) for cuBLAS.
        wdtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        w = torch.empty((module.out_features, module.in_features), device=x.device, dtype=wdtype)
        row = 0
        for c, scale, gscale, n in parts:
            triton_w4a16.decode(c, scale, gscale, w[row:row + n])
            row += n
        module.last_path = "w4a16-dq"
        y = torch.nn.functional.linear(x2.to(wdtype), w, None if b is None else b.to(wdtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


FP8_BACKEND = register(FP8Backend())
W4A16_BACKEND = register(W4A16Backend())
