"""The real frontend in headless Chromium: our nodes are there, the backend is set through the
widget (an unavailable one turns the node red with the reason), the graph is queued from the UI
and the per-path summary lands on the node."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from workflows import nvfp4_prompt

BROWSER_DIR = Path(__file__).resolve().parent / "browser"


def browser_ready():
    if not shutil.which("node"):
        return "node is not installed"
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        return "Debian chromium is not installed (apt-get install chromium)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"playwright-core is not installed (cd {BROWSER_DIR} && npm install)"
    return None


def test_ui_sets_backend_queues_and_shows_paths(server, tmp_path):
    why = browser_ready()
    if why:
        pytest.skip(why)
    prompt = nvfp4_prompt("flux1_comfy.safetensors", "auto", prefix="ui")
    pf = tmp_path / "prompt.json"
    pf.write_text(json.dumps(prompt))
    r = subprocess.run(["node", str(BROWSER_DIR / "ui_test.mjs"), server.url, str(pf), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=BROWSER_DIR)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"NVFP4ModelLoader", "NVFP4Backend", "NVFP4DemoConditioning"} <= set(seen["registered"])
    assert {"auto", "dequant", "emulate", "cudnn", "cutlass", "trtllm"} <= set(seen["options"])
    assert seen["warned"]["red"] and "unavailable" in seen["warned"]["status"]
    assert seen["outcome"]["ok"], seen["outcome"]
    assert seen["paths"]["backend"] == "dequant" and seen["paths"]["paths"]["dequant"] > 0
    assert "dequant" in seen["status_after"]
    assert (tmp_path / "ui.png").stat().st_size > 10000
    keep = Path(__file__).resolve().parents[2] / "demo_output"
    keep.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "ui.png", keep / "ui_browser_test.png")  # for a person to look at
