"""Our Triton kernels compile for real GPUs (SM 8.0 / 8.6 / 8.9 / 9.0), checked on a machine without one:
tests/triton_compile_all.py compiles every launch the plugin makes with this install's Triton and
its ptxas. The CPU interpreter runs the kernels' arithmetic but never their compiler; a construct
the compiler rejects (Triton 3.3 could not index a constexpr tuple, which the w4a16 kernels did
until the eleventh session) fails only here. And the backends refuse a Triton older than the
oldest these kernels were compiled with, naming both versions."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_nvfp4.kernels import hopper

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
HELPER = Path(__file__).with_name("triton_compile_all.py")


@pytest.mark.skipif(not PTXAS.exists(), reason=f"this Triton has no ptxas for NVIDIA GPUs ({PTXAS})")
def test_every_kernel_launch_compiles_for_ampere_ada_and_hopper_and_fits_their_shared_memory():
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # a fresh process: compiled kernels, not interpreted ones
    run = subprocess.run([sys.executable, str(HELPER), "80", "86", "89", "90"], env=env, capture_output=True, text=True,
                         timeout=900)
    summary = [line for line in run.stdout.splitlines() if " compiled, " in line]
    assert run.returncode == 0 and summary, run.stdout + run.stderr[-3000:]
    compiled = int(summary[-1].split(": ")[1].split()[0])
    # 63 with Triton 3.9: sm_90 every launch (w4a16 preparation of 3 layer shapes, its 5 small-M tiles at 2 and
    # 16 rows, fp8 preparation and every small-M config, 3 fused-block kernels), sm_89 / sm_86 / sm_80 a sample;
    # each within the 99 KB of shared memory an RTX 30xx / 40xx block gets
    assert summary[-1].endswith(" 0 failed") and compiled >= 60, summary


@pytest.mark.parametrize("version,usable", [("3.2.0", False), ("2.3.1", False), ("3.3.1", True), ("3.3.1.post19", True),
                                            ("3.10.0", True), ("4.0.0+git1234", True), ("unknown", False)])
def test_triton_older_than_the_kernels_need_is_refused_with_both_versions_named(version, usable):
    ok, why = hopper._triton_ok(version)
    assert ok is usable
    if not usable:
        assert version in why and "Triton >= 3.3" in why
    else:
        assert why == ""


def test_this_triton_is_usable():
    assert hopper._triton_ok() == (True, "")
