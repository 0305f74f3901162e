"""Compile every Triton kernel variant the plugin launches, for real GPUs, on a machine without one.

Run as a script (tests/test_triton_compiles.py does, in a fresh process: the CPU tests' interpreter
mode would wrap the kernels instead): `python tests/triton_compile_all.py 80 86 89 90`. The launches
are the ones the plugin itself builds on meta tensors (compile_ahead's preparation launches, every
small-M config) plus the fused-block kernels' launches, recorded from their wrappers; each is
compiled to a cubin with the installed Triton's own ptxas for the given SM targets (fp8 and the
fused blocks from SM 8.9, w4a16 from 8.0; all of them for the newest target, a sample for the
others). Prints one line per failure and a summary; exit status 1 when any failed to compile or
needs more shared memory than an RTX 30xx / 40xx block has. Catches what the interpreter cannot:
a construct this Triton's compiler rejects, a config too big to launch.
"""
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel is decorated
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bootstrap import ensure_package  # noqa: E402

ensure_package()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from comfyui_nvfp4.kernels import triton_fp8, triton_fused, triton_w4a16  # noqa: E402
from comfyui_nvfp4.kernels.triton_common import LayerShape, Launch, configs_for  # noqa: E402

# Shared memory a block may use on the smallest SM80+ parts (RTX 30xx / 40xx, SM 8.6 / 8.9: 99 KB);
# a launch above it compiles but fails to launch there
SHARED_LIMIT = 99 * 1024
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}
META = dict(device="meta")


def jit_function(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):  # an Autotuner or heuristics wrapper
        kernel = kernel.fn
    return kernel


def source(launch: Launch) -> tuple[ASTSource, dict]:
    """The launch as Triton's compiler input: argument types from the (meta) tensors and values,
    constexprs from its options, 16-byte divisibility where a real launch would have it."""
    fn = jit_function(launch.kernel)
    options = dict(launch.options)
    compile_options = {"num_warps": options.pop("num_warps", 4), "num_stages": options.pop("num_stages", 3)}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = launch.args[i] if i < len(launch.args) else options.get(name)
        if name in options or i >= len(launch.args):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
            if value % 16 == 0 and i not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} is a {type(value).__name__}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), compile_options


def w4a16_launches() -> list[Launch]:
    launches = []
    for layer in (LayerShape((3072,), 3072, True), LayerShape((66, 134), 256, False), LayerShape((3072,), 12288, True)):
        launches += triton_w4a16.preparation_launches(layer, torch.device("meta"))
    n, k = 3072, 3072
    codes = torch.empty((n, k // 2), dtype=torch.uint8, **META)
    scales = torch.empty((n, k // 16), dtype=torch.uint8, **META)
    gscale = torch.empty((), dtype=torch.float32, **META)
    for m, split in ((2, 1), (16, 4)):  # every tile the tests run, with and without a K split
        x = torch.empty((m, k), dtype=torch.bfloat16, **META)
        out = torch.empty((m, n), dtype=torch.bfloat16, **META)
        for config in triton_w4a16.CONFIGS:
            launches.append(triton_w4a16._small_m_launch(x, codes, scales, gscale, None, out, config, split))
    fp16_weight = torch.empty((n, k), dtype=torch.float16, **META)
    launches.append(triton_w4a16._decode_launch(codes, scales, gscale, fp16_weight))
    return launches


def fp8_launches() -> list[Launch]:
    launches = []
    for layer in (LayerShape((3072,), 3072, True), LayerShape((66, 134), 256, False), LayerShape((9216,), 3072, True)):
        launches += triton_fp8.preparation_launches(layer, 32)
    n, k = 3072, 3072
    w8 = torch.empty((n, k), dtype=torch.float8_e4m3fn, **META)
    ws = torch.empty(n, dtype=torch.float32, **META)
    bias = torch.empty(n, dtype=torch.bfloat16, **META)
    for m in (1, 16):  # every config the autotuner may time
        _, _, args, keys = triton_fp8._small_m_call(torch.empty((m, k), dtype=torch.bfloat16, **META), w8, ws, bias,
                                                    torch.bfloat16)
        for config in configs_for(triton_fp8._small_m_kernel, **keys):
            launches.append(Launch(triton_fp8._small_m_kernel.fn, (triton.cdiv(n, config["BN"]),), args,
                                   {**keys, **config}))
    launches.append(triton_fp8._act_quant_launch(torch.empty((4096, 12288), dtype=torch.bfloat16, **META))[2])
    return launches


class _Recorder:
    """Stands in for a fused-block kernel while its wrapper runs on meta tensors: records the
    launch the wrapper makes instead of running it."""

    def __init__(self, kernel, into: list):
        self.kernel, self.into = kernel, into

    def __getitem__(self, grid):
        return lambda *args, **options: self.into.append(Launch(self.kernel, grid, args, options))


def fused_launches() -> list[Launch]:
    launches = []
    names = ("_ln_mod_quant_kernel", "_gelu_quant_kernel", "_swiglu_quant_kernel", "_qk_norm_rope_kernel")
    kernels = {name: getattr(triton_fused, name) for name in names}
    try:
        for name, kernel in kernels.items():
            setattr(triton_fused, name, _Recorder(kernel, launches))
        bf16 = dict(dtype=torch.bfloat16, **META)
        x = torch.empty((1, 4096, 3072), **bf16)
        mod = torch.empty((1, 1, 6 * 3072), **bf16)
        triton_fused.ln_mod_quant(x, mod[:, :, :3072], mod[:, :, 3072:6144])
        triton_fused.gelu_quant(torch.empty((4096, 12288), **bf16), prefix=torch.empty((4096, 3072), **bf16))
        triton_fused.swiglu_quant(torch.empty((4096, 36864), **bf16), prefix=torch.empty((4096, 6144), **bf16))
        heads, d, length = 24, 128, 512
        qkv = torch.empty((1, length, 3 * heads * d), **bf16)
        q, k, v = (torch.empty((1, heads, 4096 + length, d), **bf16) for _ in range(3))
        pe = torch.empty((1, 1, 4096 + length, d // 2, 2, 2), dtype=torch.float32, **META)
        triton_fused.qk_norm_rope(qkv, heads, torch.empty(d, **bf16), torch.empty(d, **bf16), 1e-6, 1e-6, pe,
                                  q, k, v, 0)
    finally:
        for name, kernel in kernels.items():
            setattr(triton_fused, name, kernel)
    return launches


def check_decode_in_registers(ttgir: str) -> None:
    """The small-M w4a16 kernel's K loop moves nothing between layouts and stores nothing to shared
    memory itself (only the pipeliner's async copies fill it): its decoded weights go from the
    words' registers straight into the MMA (the kernel's speed rests on this). Checked from
    Triton 3.5 on; 3.3 does not pipeline the activations' load and stores them in the loop."""
    if not triton_w4a16.NARROW_DOT:
        return
    loop = ttgir[ttgir.index("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    moves = {op: loop.count(op) for op in ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_store")}
    if any(moves.values()):
        raise RuntimeError(f"the K loop moves data between layouts or into shared memory: {moves}")


def main(archs: list[int]) -> int:
    """Every launch for the newest arch asked for; for the others, each group's first three (its
    first layer's preparation), which is where an arch-specific instruction would show."""
    groups = [("w4a16", 80, w4a16_launches()), ("fp8", 89, fp8_launches()), ("fused", 89, fused_launches())]
    compiled = failed = 0
    for arch in archs:
        for group, minimum, launches in groups:
            if arch < minimum:
                continue
            for launch in launches if arch == max(archs) else launches[:3]:
                try:
                    src, options = source(launch)
                    kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    if kernel.metadata.shared > SHARED_LIMIT:
                        raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory, SM 8.6 / 8.9 "
                                           f"GPUs have {SHARED_LIMIT}")
                    if jit_function(launch.kernel) is triton_w4a16._small_m_kernel:
                        check_decode_in_registers(kernel.asm["ttgir"])
                    compiled += 1
                except Exception as e:  # report every failure, then fail
                    failed += 1
                    cause = e
                    while cause.__cause__ is not None:  # nested CompilationErrors: the innermost says why
                        cause = cause.__cause__
                    message = str(cause).strip().splitlines()
                    print(f"FAILED sm_{arch} {group} {jit_function(launch.kernel).__name__} {launch.options}: "
                          f"{type(cause).__name__}: {message[-1] if message else ''}", flush=True)
    print(f"triton {triton.__version__}: {compiled} compiled, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 89, 90]))
