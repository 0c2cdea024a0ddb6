"""Install what vdu-unlearn needs that the host (ComfyUI, ComfyUI-Manager, the WebUI) lacks.

Run by ComfyUI-Manager and by the Stable Diffusion WebUI at start-up, with the host's Python.
Never touches torch: the installed version is pinned through a constraints file, so no
requirement can pull a different (multi-GB, possibly CPU-only) build over the user's.

In the WebUI (A1111, Forge: its `launch` module is importable, as the WebUI puts its folder on
PYTHONPATH for extension installers) only what the WebUI path imports is checked — the engine's
core, never diffusers, transformers or peft, whose requirements would move the WebUI's pinned
transformers 4.x — and installed with the WebUI's own `launch.run_pip`.
"""

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def _version_tuple(v: str):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def missing_requirements():
    """Requirement lines whose package is absent or older than the minimum asked."""
    out = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, minimum = (re.split(r"(>=|==)", line) + ["", ""])[:3]
        name = name.strip()
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            out.append(line)
    return out


# What the WebUI tab imports beyond the WebUI itself (distribution name, minimum version).
WEBUI_REQUIREMENTS = (("safetensors", "0.4"), ("numpy", ""), ("pillow", ""))


def webui_launch():
    """The WebUI's `launch` module when a WebUI runs this file, else None."""
    try:
        import launch
    except Exception:  # not a WebUI (ComfyUI, a shell), or one whose launcher cannot import here
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def webui_main(launch) -> int:
    need = [f"{name}>={low}" if low else name for name, low in WEBUI_REQUIREMENTS
            if not launch.is_installed(name) or (low and _version_tuple(metadata.version(name)) < _version_tuple(low))]
    if not need:
        print("[vdu-unlearn] all requirements present")
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        c.write(f"torch=={metadata.version('torch')}\n")  # the WebUI always has its torch by now
    try:
        launch.run_pip(f'install -c "{c.name}" ' + " ".join(f'"{r}"' for r in need), f"vdu-unlearn: {', '.join(need)}")
    finally:
        os.unlink(c.name)
    return 0


def main() -> int:
    launch = webui_launch()
    if launch is not None:
        return webui_main(launch)
    need = missing_requirements()
    if not need:
        print("[vdu-unlearn] all requirements present")
        return 0
    print(f"[vdu-unlearn] installing: {' '.join(need)}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        try:
            c.write(f"torch=={metadata.version('torch')}\n")
        except metadata.PackageNotFoundError:
            pass  # no torch yet: the host will install its own; we still never ask for one
    try:
        return subprocess.call([sys.executable, "-m", "pip", "install", "-c", c.name, *need])
    finally:
        os.unlink(c.name)


if __name__ == "__main__":
    sys.exit(main())
