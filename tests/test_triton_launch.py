"""triton_common.launch: autotuned calls from several threads never overlap (Triton's Autotuner
keeps per-call state on the kernel object); explicit-config calls go straight to the kernel;
inside tuning.untuned() an autotuned kernel runs its first config instead of timing them."""
import threading
import time

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
from comfyui_nvfp4.kernels.triton_common import launch  # noqa: E402
from comfyui_nvfp4.kernels.tuning import tuning_allowed, untuned  # noqa: E402


class Recorder:
    """Something indexable by a grid and callable like a Triton kernel, that records how many
    calls were inside it at once (the autotuner's timing takes a while: sleep)."""

    def __init__(self):
        # an autotuner's config list and pruning (keeps the configs whose BN fits MP rows)
        self.configs = [triton.Config({"BN": 64}, num_warps=8), triton.Config({"BN": 16}, num_warps=4, num_stages=2),
                        triton.Config({"BN": 32}, num_warps=4)]
        self.early_config_prune = lambda configs, named_args, **kw: [c for c in configs if c.kwargs["BN"] * kw["MP"] <= 32]
        self.inside = 0
        self.most_inside = 0
        self.calls = []
        self.count_lock = threading.Lock()
        self.fn = self  # what launch() calls for an explicit config

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            with self.count_lock:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
            time.sleep(0.01)
            with self.count_lock:
                self.inside -= 1
                self.calls.append((grid, args, kwargs))
        return call


def test_autotuned_launches_from_threads_are_serialized():
    k = Recorder()
    threads = [threading.Thread(target=launch, args=(k, (i,), (i,), {"N": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert k.most_inside == 1
    assert sorted(c[0][0] for c in k.calls) == list(range(8))  # each call ran with its own arguments


def test_explicit_config_goes_to_the_kernel_with_the_config():
    k = Recorder()
    launch(k, (2,), ("a",), {"N": 5}, config={"BN": 16, "num_warps": 4})
    assert k.calls == [((2,), ("a",), {"N": 5, "BN": 16, "num_warps": 4})]


def test_untuned_runs_the_first_config_that_fits_instead_of_tuning():
    k = Recorder()
    with untuned():
        assert not tuning_allowed()
        launch(k, (1,), ("a",), {"MP": 2})
    assert tuning_allowed()
    # BN=64 is pruned for MP=2; the first left is BN=16 with its launch options
    assert k.calls == [((1,), ("a",), {"MP": 2, "BN": 16, "num_warps": 4, "num_stages": 2})]
    launch(k, (1,), ("b",), {"MP": 2})  # outside: through the autotuner (kernel[grid]) as before
    assert k.calls[-1] == ((1,), ("b",), {"MP": 2})


def test_untuned_is_per_context_not_global():
    seen = []
    with untuned():
        t = threading.Thread(target=lambda: seen.append(tuning_allowed()))  # a thread that did not inherit it
        t.start()
        t.join()
    assert seen == [True]


def test_host_integer_helpers_equal_tritons():
    # cdiv / next_pow2 replace triton.cdiv / triton.next_power_of_2 on the per-call paths
    from comfyui_nvfp4.kernels.triton_common import cdiv, next_pow2
    for n in list(range(0, 4200)) + [15360, 18432, 36864, 2**20, 2**20 + 1]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
