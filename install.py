"""Install what vdu-unlearn needs that the host (ComfyUI, ComfyUI-Manager, the WebUI) lacks.

Run by ComfyUI-Manager and by the Stable Diffusion WebUI at start-up, with the host's Python.
Never touches torch: the installed version is pinned through a constraints file, so no
requirement can pull a different (multi-GB, possibly CPU-only) build over the user's.
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


def main() -> int:
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
