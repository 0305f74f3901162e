"""fast_launch's assumptions about Triton, checked against the installed Triton itself.

A DirectLauncher reuses a compiled kernel for every later call with the same variant key, so
the key must tell apart every pair of calls that Triton's own specialization tells apart. These
tests run Triton's specialization (its native specialize_impl, the function its launch path binds
every argument with) on tensors at every byte offset, on ints, bools, floats and None, and check
that equal variant keys always mean equal Triton specializations. The launches themselves need a
GPU: tests/gpu/test_direct_launch.py.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

from comfyui_nvfp4.kernels.fast_launch import arg_keys, supports_direct_launch, variant_key  # noqa: E402


def _arg_key(a):
    return arg_keys((a,))[0]


def triton_specialization(arg, backend=CUDABackend):
    # as Triton's launch path binds a parameter: not const, specialized, alignment-specialized
    return native_specialize_impl(backend, arg, False, True, True)


def args_of_every_kind():
    raw = torch.zeros(1024, dtype=torch.uint8)
    tensors = [raw[off:].view(dtype) for off in range(0, 64) for dtype in (torch.uint8,)]
    tensors += [raw[off:off + 512].view(dtype) for off in range(0, 64, 2) for dtype in (torch.bfloat16, torch.float16)]
    tensors += [raw[off:off + 512].view(torch.int32) for off in range(0, 64, 4)]
    tensors += [torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=torch.float8_e4m3fn)]
    ints = [0, 1, 2, 3, 15, 16, 17, 32, 48, 3072, 9216, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, 2**63 - 1, 2**64 - 16]
    return tensors + ints + [True, False, 0.0, 0.5, 1e-6, 3.0, -2.5, None]


def test_equal_variant_keys_mean_equal_triton_specializations():
    args = args_of_every_kind()
    seen: dict = {}
    for a in args:
        seen.setdefault(_arg_key(a), set()).add(repr(triton_specialization(a)))
    split = {k: v for k, v in seen.items() if len(v) > 1}
    assert not split, f"one variant key, several Triton specializations: {split}"


def test_the_key_tells_apart_what_triton_tells_apart_and_what_it_does_not_is_harmless():
    # the key is finer (exact ints), never coarser: two args Triton specializes differently never
    # share a key (the property above, pairwise, with the arguments that matter named)
    raw = torch.zeros(256, dtype=torch.uint8)
    aligned, misaligned = raw[16:].view(torch.uint8), raw[8:].view(torch.uint8)
    assert triton_specialization(aligned) != triton_specialization(misaligned)
    assert _arg_key(aligned) != _arg_key(misaligned)
    assert triton_specialization(True) != triton_specialization(1) and _arg_key(True) != _arg_key(1)
    assert triton_specialization(0.5) == triton_specialization(1e-6)  # floats: one variant for all values
    for x, y in itertools.combinations([1, 16, 17, 2**31], 2):
        assert _arg_key(x) != _arg_key(y)


def test_nvidia_backend_specializes_like_the_base_backend():
    # supports_direct_launch relies on it: CUDA pointers keyed on 16-byte alignment only
    raw = torch.zeros(256, dtype=torch.uint8)
    for off in range(64):
        assert triton_specialization(raw[off:], CUDABackend) == triton_specialization(raw[off:], BaseBackend), off


def test_this_triton_launches_the_way_direct_launches_do():
    # a Triton upgrade that changes its launch convention turns direct launches off (warned); this
    # test then fails so the change is seen, not just slower
    assert supports_direct_launch() == (True, "")


def test_variant_key_holds_constexprs_and_launch_options():
    t = torch.zeros(4, dtype=torch.bfloat16)
    assert variant_key((t, 3), {"BN": 64, "num_warps": 2}) != variant_key((t, 3), {"BN": 64, "num_warps": 4})
    assert variant_key((t, 3), {"BN": 64}) == variant_key((t, 3), {"BN": 64})


def test_direct_launches_can_be_turned_off(monkeypatch):
    from comfyui_nvfp4.kernels import fast_launch
    monkeypatch.setenv(fast_launch.ENV_VAR, "0")
    assert fast_launch._direct_launch_check() == (False, "NVFP4_DIRECT_LAUNCH=0")
    monkeypatch.setenv(fast_launch.ENV_VAR, "1")
    assert fast_launch._direct_launch_check() == (True, "")
