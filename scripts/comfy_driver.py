"""Start a real ComfyUI server with this plugin installed, and talk to it the way ComfyUI's own
execution tests do: POST /prompt, follow /ws, read /history."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "COMFYUI_PATH"


def comfyui_path() -> Path | None:
    p = os.environ.get(ENV_VAR)
    return Path(p) if p and (Path(p) / "main.py").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, extra_args=(), python: str | None = None):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        nodes = base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / "comfyui_nvfp4"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
        self.log_path = base / f"server-{self.port}.log"
        cmd = [python or os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(base), *extra_args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        import websocket  # websocket-client; imported here so collecting host tests never needs it

        self.client_id = str(uuid.uuid4())
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                              timeout=600)

    def _wait_ready(self, timeout=180):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def run(self, prompt: dict, timeout=900, on_message=None) -> dict:
        """Queue a prompt, follow /ws until it finishes; returns history + ws messages."""
        r = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if "prompt_id" not in r:
            return {"status": "rejected", "response": r, "messages": []}
        pid = r["prompt_id"]
        messages = []
        t0 = time.time()
        while time.time() - t0 < timeout:
            raw = self.ws.recv()
            if isinstance(raw, bytes):
                messages.append({"type": "binary", "data": raw})
                continue
            msg = json.loads(raw)
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
            d = msg.get("data", {})
            if d.get("prompt_id") != pid:
                continue
            if msg["type"] == "executing" and d.get("node") is None:
                break
            if msg["type"] == "execution_error":
                break
        hist = self.get(f"/history/{pid}").get(pid, {})
        errors = [m for m in messages if m.get("type") == "execution_error"]
        return {"status": "error" if errors else "success", "prompt_id": pid, "history": hist,
                "messages": messages, "errors": [e["data"] for e in errors]}

    def progress_texts(self, messages, node_id: str) -> list[str]:
        """Texts sent with send_progress_text for a node (binary event type 3)."""
        import struct
        out = []
        for m in messages:
            if m.get("type") != "binary":
                continue
            raw = m["data"]
            if struct.unpack(">I", raw[:4])[0] != 3:
                continue
            body = raw[4:]
            n = struct.unpack(">I", body[:4])[0]
            if body[4:4 + n].decode() == str(node_id):
                out.append(body[4 + n:].decode())
        return out

    def stop(self):
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
