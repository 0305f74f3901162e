"""The benchmark scripts (benchmarks/*.py) run on the device, never in CI; this keeps them from
rotting on the CPU side: each one's imports resolve and its command line parses (`--help`), in
one fresh interpreter, as `python benchmarks/<script>.py` would run it. A script that imports a
name another script no longer has fails here instead of on the device."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))

# Runs each script as __main__ with --help, its own folder first on sys.path (as `python script`
# does), and prints one line per script: its name, then "ok" or the error.
_RUNNER = r"""
import contextlib, io, os, runpy, sys, traceback
base_path = list(sys.path)
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path[:] = [os.path.dirname(script)] + base_path
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        result = "no exit: --help did not stop the script"
    except SystemExit as e:
        result = "ok" if e.code in (0, None) and "usage:" in out.getvalue() else f"exit {e.code}: {out.getvalue()[-300:]}"
    except BaseException:
        result = traceback.format_exc(limit=3)[-600:].replace("\n", " | ")
    print(os.path.basename(script), result, flush=True)
"""


def test_the_benchmark_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_gemm.py", "bench_step.py", "bench_overhead.py"} <= names, names


def test_every_benchmark_script_imports_and_parses_its_command_line():
    done = subprocess.run([sys.executable, "-c", _RUNNER, *map(str, SCRIPTS)], capture_output=True, text=True,
                          timeout=600, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ", 1)[0].endswith(".py"))
    assert set(results) == {p.name for p in SCRIPTS}, done.stdout + done.stderr[-2000:]
    broken = {name: why for name, why in results.items() if why != "ok"}
    assert not broken, broken
