"""triton_common.launch: autotuned calls from several threads never overlap (Triton's Autotuner
keeps per-call state on the kernel object); explicit-config calls go straight to the kernel."""
import threading
import time

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
from comfyui_nvfp4.kernels.triton_common import launch  # noqa: E402


class Recorder:
    """Something indexable by a grid and callable like a Triton kernel, that records how many
    calls were inside it at once (the autotuner's timing takes a while: sleep)."""

    def __init__(self):
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
