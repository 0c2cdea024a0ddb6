"""Screenshot of the Unlearn tab in a real A1111 v1.10.1, rendered by headless Chromium.

    A1111_PATH=... .venv-a1111/bin/python tests/webui/screenshot.py docs/webui_unlearn_tab.png

Starts A1111's own webui.py (gradio served on 127.0.0.1, the SD 1.5-shaped test checkpoint, CPU
flags as in test_a1111.py), opens it in Debian's Chromium (`apt-get install chromium`) through
the DevTools protocol (the `websockets` package gradio already brings), clicks the Unlearn tab
and saves the page. Nothing is replaced: this is the page a user sees.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from webui_harness import install_extension  # noqa: E402

A1111 = Path(os.environ["A1111_PATH"])
FLAGS = ["--use-cpu", "all", "--no-half", "--precision", "full", "--skip-torch-cuda-test", "--skip-version-check",
         "--no-download-sd-model", "--skip-prepare-environment"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def prepare(work: Path) -> list:
    """The data folder (extension linked, checkpoint and its .yaml, CLIP files) and webui.py's argv."""
    sys.path.insert(0, str(A1111 / "repositories" / "stable-diffusion-stability-ai"))
    from sd15_shaped import clip_l_hub_cache, with_ldm
    data = work / "data"
    install_extension(data / "extensions")
    ckpt = data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        with_ldm(ckpt, A1111)
    clip_l_hub_cache(work / "hf")
    return [*FLAGS, "--data-dir", str(data), "--ckpt", str(ckpt)]


async def capture(ws_url: str, page: str, out: Path) -> None:
    import websockets
    async with websockets.connect(ws_url, max_size=None) as ws:
        ids = iter(range(1, 10_000))

        async def call(method, **params):
            i = next(ids)
            await ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == i:
                    return msg.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=page)
        # gradioApp() is A1111's own helper (script.js); the tab buttons are gradio's
        click = ("(() => { if (typeof gradioApp !== 'function') return false; const b = [...gradioApp()"
                 ".querySelectorAll('#tabs button')].find(b => b.textContent.trim() === 'Unlearn');"
                 " if (b) b.click(); return !!b; })()")
        for _ in range(240):  # the UI builds itself after load
            await asyncio.sleep(1)
            if (await call("Runtime.evaluate", expression=click, returnByValue=True))["result"].get("value"):
                break
        else:
            raise RuntimeError("no Unlearn tab on the page")
        await asyncio.sleep(3)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="vdu-shot-"))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    port, debug = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "webui.py", *prepare(work), "--port", str(port)], cwd=A1111, env=env,
                              stdout=open(work / "webui.log", "w"), stderr=subprocess.STDOUT)
    browser = None
    try:
        wait_for(f"http://127.0.0.1:{port}/", server)
        browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                                    f"--remote-debugging-port={debug}", f"--user-data-dir={work / 'chrome'}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{debug}/json/version", browser, 60)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{debug}/json").read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        asyncio.run(capture(ws_url, f"http://127.0.0.1:{port}/?__theme=light", out))
        print(f"wrote {out}")
    finally:
        for p in (browser, server):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
