"""Running the pack inside a real ComfyUI: in-process imports, or a headless server.

ComfyUI is found through COMFYUI_PATH (a checkout of Comfy-Org/ComfyUI; `tools/setup_comfy.sh`
prepares one and the venv it needs). Tests that need it skip, saying why, when it is absent or
when the running Python cannot import ComfyUI (it needs torchvision: run them with
.venv-comfy/bin/python, which `make test` does).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]


def comfy_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "main.py").exists():
        pytest.skip("ComfyUI tests need COMFYUI_PATH pointing at a ComfyUI checkout (tools/setup_comfy.sh makes one)")
    try:
        import torchvision  # noqa: F401  (ComfyUI imports it at start)
    except ImportError:
        pytest.skip("ComfyUI tests need torchvision: run them with .venv-comfy/bin/python (make test does)")
    return Path(path)


def import_comfy():
    """Make `comfy`, `folder_paths` and this pack importable in-process."""
    root = comfy_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if str(PACK.parent) not in sys.path:
        sys.path.insert(0, str(PACK.parent))
    import importlib

    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # as `main.py --cpu`; must precede comfy.model_management
    return importlib.import_module(PACK.name)  # the pack, as ComfyUI would load it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI on 127.0.0.1 with its own base directory and this pack installed."""

    def __init__(self, base: Path):
        self.root, self.base, self.port = comfy_path(), base, _free_port()
        for d in ("models/checkpoints", "models/loras", "input", "output", "custom_nodes", "user"):
            (base / d).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "vdu-unlearn"
        if not link.exists():
            link.symlink_to(PACK, target_is_directory=True)
        self.log_path = base / "comfyui.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "ComfyServer":
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--disable-metadata"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in {timeout} s:\n{self.log()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} → {e.code}: {e.read().decode()}") from None

    def queue(self, api_prompt: dict) -> str:
        return self.post("/prompt", {"prompt": api_prompt, "client_id": "vdu-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry once the prompt has finished (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("status_str") == "error":
                return hist[prompt_id]
            time.sleep(1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")

    def interrupt(self):
        self.post("/interrupt", {})
