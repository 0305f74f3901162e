"""Kernels compiled in the background while preparation runs (kernels/compile_ahead.py).

There is no GPU here, so Triton's JIT functions are stood in for by _JitKernel, which answers
`warmup` the way Triton's does: under the caller's AsyncCompileMode (the real one, from the
installed Triton) it queues its compile on the mode's pool and returns the mode's FutureKernel;
without one it compiles in the calling thread. The compiled kernel has Triton's lazy loader
`_init_handles`. What is under test is ours: the per-shape ordering and waits, one compile and
one load per shared variant, errors reaching the layer that needs the kernel, and preparation
taking layers in compile order, each after its kernels, and finding what the loader started
(preparation.start_compiling) done. tests/gpu runs the real kernels. The layers are real NVFP4
layers and modules (their LayerShape picks the kernels).
"""
import inspect
import itertools
import threading
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")
from triton.runtime import _async_compile  # noqa: E402

from comfyui_nvfp4.kernels import compile_ahead, preparation, registry  # noqa: E402
from comfyui_nvfp4.kernels.compile_ahead import TritonKernelsAhead  # noqa: E402
from comfyui_nvfp4.kernels.triton_common import Launch  # noqa: E402
from comfyui_nvfp4.quant import nvfp4  # noqa: E402
from comfyui_nvfp4.quant.layers import NVFP4Linear  # noqa: E402
from test_selection import _DenseCopy, mod  # noqa: E402

CPU = torch.device("cpu")
WAIT = 10  # seconds: a wait that has not returned by then never will
_TOKENS = itertools.count()


@pytest.fixture(autouse=True)
def _nothing_compiled_yet():
    """What was compiled is remembered for the process; each test starts from nothing."""
    compile_ahead.forget()
    yield
    compile_ahead.forget()


class _Compiled:
    """Loads like Triton's CompiledKernel: once, marked loaded only at the end (so a second
    thread entering halfway would load it again)."""

    def __init__(self, variant, log):
        self.variant, self.log, self.loaded = variant, log, False

    def _init_handles(self):
        if self.loaded:
            return
        time.sleep(0.01)
        self.log.append(("load", self.variant))
        self.loaded = True


class _JitKernel:
    """Answers warmup like triton's JITFunction: one compiled kernel per variant, cached."""

    def __init__(self, log, gates=None, fails=()):
        self.log, self.gates, self.fails = log, gates or {}, set(fails)
        self.cache, self.token = {}, next(_TOKENS)

    def _compile(self, variant):
        gate = self.gates.get(variant)
        if gate is not None and not gate.wait(WAIT):
            raise TimeoutError(variant)
        self.log.append(("compile", variant))
        if variant in self.fails:
            raise ValueError(f"ptxas failed on {variant}")
        return _Compiled(variant, self.log)

    def warmup(self, variant, *, grid, **options):
        if variant in self.cache:
            return self.cache[variant]
        mode = _async_compile.active_mode.get()
        if mode is None:
            self.cache[variant] = self._compile(variant)
            return self.cache[variant]
        finalize = lambda k: self.cache.__setitem__(variant, k)  # noqa: E731
        extra = [lambda fk: None] * ("cleanup_fn" in inspect.signature(mode.submit).parameters)  # Triton 3.9
        return mode.submit((self.token, variant), lambda: self._compile(variant), finalize, *extra)


def _launches(kernel, variants):
    return [Launch(kernel, (1,), (v,), {}) for v in variants]


def _in_thread(fn):
    """fn() in a thread; (finished within WAIT s, its exception or None)."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WAIT)
    return not t.is_alive(), box.get("error")


def _layer(rows, k=128, bias=False):
    """A real NVFP4 layer of this shape (what the loader reads)."""
    w = nvfp4.quantize(torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)))
    return NVFP4Linear([w], torch.zeros(rows, dtype=torch.bfloat16) if bias else None)


def _ahead(kernel, layers, name="test"):
    """Shapes of 32 rows are 'a', of 48 'b', of 64 rows and more 'c<rows>'; each runs the shared
    variant 'pack' and one of its own; K must be a multiple of 128."""
    def launches(shape):
        tag = {32: "a", 48: "b"}.get(shape.rows[0], f"c{shape.rows[0]}")
        return _launches(kernel, ["pack", f"small-{tag}"])
    return TritonKernelsAhead(name, layers, launches, CPU, needs=lambda shape: shape.k % 128 == 0)


@pytest.mark.parametrize("async_mode", [True, False])
def test_a_layer_waits_only_for_its_own_shape(monkeypatch, async_mode):
    if not async_mode:  # Triton before 3.4: each shape's finishing task compiles its own
        monkeypatch.delattr(triton, "AsyncCompileMode")
    log = []
    gate_b = threading.Event()
    kernel = _JitKernel(log, gates={"small-b": gate_b})
    a1, b1, a2, other = _layer(32), _layer(48), _layer(32), _layer(32, k=64)
    ahead = _ahead(kernel, [a1, b1, a2, other])
    assert ahead.launches == 4 and ahead.covers
    assert [ahead.order(m) for m in (a1, b1, a2, other)] == [0, 1, 0, 2]
    done, error = _in_thread(lambda: ahead.wait(a2))
    assert done and error is None, "shape a's layers waited for shape b's compile"
    assert {("load", "pack"), ("load", "small-a")} <= set(log)
    assert ("compile", "small-b") not in log
    assert _in_thread(lambda: ahead.wait(other)) == (True, None)  # needs no kernel
    gate_b.set()
    assert _in_thread(lambda: ahead.wait(b1)) == (True, None)
    assert ahead.close() > 0
    assert log.count(("compile", "pack")) == 1 and log.count(("load", "pack")) == 1, log
    assert {e for e in log} == {(what, v) for what in ("compile", "load") for v in ("pack", "small-a", "small-b")}


def test_a_variant_many_shapes_share_is_compiled_and_loaded_once():
    log = []
    kernel = _JitKernel(log)
    ahead = _ahead(kernel, [_layer(64 + 16 * i) for i in range(8)])
    ahead.close()
    assert log.count(("compile", "pack")) == 1 and log.count(("load", "pack")) == 1, log
    assert len(log) == 2 * 9


def test_what_was_asked_for_before_is_joined_not_compiled_again():
    """The loader asks per layer as it reads; preparation asks again for all: shapes already
    queued (done or still compiling) are waited for, only new ones are queued."""
    log = []
    gate = threading.Event()
    kernel = _JitKernel(log, gates={"small-b": gate})
    first = _ahead(kernel, [_layer(32)])
    second = _ahead(kernel, [_layer(48)])  # still compiling when the third asks
    third = _ahead(kernel, [_layer(32), _layer(48), _layer(64)])
    assert (first.launches, second.launches, third.launches) == (2, 2, 2)
    assert _in_thread(lambda: third.wait(_layer(32))) == (True, None)
    done, _ = _in_thread(lambda: third.wait(_layer(64)))
    assert done
    gate.set()
    assert third.close() >= 0 and second.close() > 0
    assert sorted(v for what, v in log if what == "compile") == ["pack", "small-a", "small-b", "small-c64"]
    assert _ahead(kernel, [_layer(32)], name="other backend").launches == 2  # per backend


def test_a_compile_error_reaches_the_layers_that_need_that_kernel():
    log = []
    kernel = _JitKernel(log, fails={"small-b"})
    a, b = _layer(32), _layer(48)
    ahead = _ahead(kernel, [a, b])
    assert _in_thread(lambda: ahead.wait(a)) == (True, None)
    done, error = _in_thread(lambda: ahead.wait(b))
    assert done and isinstance(error, ValueError) and "ptxas failed on small-b" in str(error)
    assert ("load", "small-b") not in log
    assert _in_thread(lambda: ahead.close(cancel=True)) == (True, None)
    # asked again, the failed shape is compiled again (and fails again, named), the good one is not
    again = _ahead(kernel, [a, b])
    assert again.launches == 2
    done, error = _in_thread(lambda: again.wait(b))
    assert done and "ptxas failed on small-b" in str(error)
    assert log.count(("compile", "small-b")) == 2 and log.count(("compile", "small-a")) == 1


class _CompilingCopy(_DenseCopy):
    """_DenseCopy whose kernels (one per layer width) compile ahead; prepare records whether its
    layer's kernel was loaded by then."""
    name = "compiling-copy"

    def __init__(self, fails=(), gates=None):
        super().__init__()
        self.log, self.prepared = [], []
        self.kernel = _JitKernel(self.log, gates=gates, fails=fails)

    def compile_ahead(self, modules, device):
        return TritonKernelsAhead(self.name, modules, lambda shape: _launches(self.kernel, [shape.rows[0]]), device)

    def prepare(self, module):
        loaded = {v for what, v in list(self.log) if what == "load"}
        self.prepared.append((module.layer_name, module.out_features in loaded, 96 in loaded))
        return super().prepare(module)


def test_preparation_takes_layers_in_compile_order_each_after_its_kernels():
    widths = [64, 80, 96, 64, 80, 96, 64]  # three shapes, interleaved as a model's blocks are
    mods = [mod(n=n, seed=i, name=f"l{i}") for i, n in enumerate(widths)]
    gate = threading.Event()
    b = _CompilingCopy(gates={96: gate})
    threading.Timer(0.3, gate.set).start()  # the last shape compiles slowest
    t0 = time.perf_counter()
    info = preparation.prepare_modules(mods, b, CPU, self_check=True, workers=1)
    assert info["prepared_layers"] == 7 and info["compile_launches"] == 3
    assert 0 < info["compile_seconds"] <= time.perf_counter() - t0
    # one worker: the shapes in the order they were queued, model order within a shape
    assert [name for name, _, _ in b.prepared] == ["l0", "l3", "l6", "l1", "l4", "l2", "l5"]
    assert all(own for _, own, _ in b.prepared), b.prepared
    # the first shapes' layers were prepared while the last one still compiled
    assert not any(last for name, _, last in b.prepared if name in ("l0", "l3", "l6")), b.prepared
    for m in mods:
        assert torch.equal(m._parameters["prep_compiling-copy_w"], m.canonical().dequantize(torch.float32))


@pytest.mark.parametrize("workers", [1, 3])
def test_preparation_stops_at_a_kernel_that_does_not_compile(workers):
    mods = [mod(n=n, seed=i, name=f"l{i}") for i, n in enumerate([64, 80, 64, 80])]
    b = _CompilingCopy(fails={80})
    with pytest.raises(ValueError, match="ptxas failed on 80"):
        preparation.prepare_modules(mods, b, CPU, self_check=True, workers=workers)
    assert all(m.prepared_backends() == set() for m in mods if m.out_features == 80)
    assert registry.get("dequant").run(mods[1], torch.randn(2, 64)).shape == (2, 80)  # still runs the dequant way


def test_preparation_finds_what_the_loader_started():
    """The loader calls start_compiling with each checkpoint layer it reads; the modules built
    from those layers have the same LayerShape, so preparation queues nothing and waits not."""
    from comfyui_nvfp4.kernels.module import NVFP4LinearModule
    from comfyui_nvfp4.kernels.triton_common import LayerShape
    layers = [_layer(n, k=64, bias=True) for n in (64, 80, 64)] + [_layer(96, k=64)]
    mods = []
    for i, layer in enumerate(layers):
        m = NVFP4LinearModule(64, layer.shape[0], bias=layer.bias is not None)
        m.layer_name = f"l{i}"
        m.set_layer(layer)
        assert LayerShape.of(m) == LayerShape.of(layer)
        mods.append(m)
    b = _CompilingCopy()
    for layer in layers:  # as the loader reads them
        started = preparation.start_compiling([layer], CPU, backends=[b, registry.get("dequant")])
        assert len(started) == 1  # dequant prepares nothing
    for a in started:
        a.close()
    compiled = list(b.log)
    info = preparation.prepare_modules(mods, b, CPU, self_check=False, workers=1)
    assert info["prepared_layers"] == 4 and info["compile_launches"] == 0 and info["compile_seconds"] == 0
    assert b.log == compiled and sorted(v for what, v in compiled if what == "compile") == [64, 80, 96]
    assert all(own for _, own, _ in b.prepared)
