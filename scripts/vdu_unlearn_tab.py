"""WebUI entry point (A1111 1.10, Forge): adds the Unlearn tab, nothing else.

The WebUI imports `scripts/*.py` by path, never the pack's root `__init__.py` (ComfyUI's). So the
pack's folder is registered here as the package `vdu_unlearn` without running that file, and the
tab, the engine and the ComfyUI backend (which Forge's backend reuses) are its sub-packages, with
their relative imports, one copy of each.
"""

import importlib
import sys
import types
from pathlib import Path

from modules import script_callbacks

PACK = "vdu_unlearn"


def _pack():
    if PACK not in sys.modules:
        pkg = types.ModuleType(PACK)
        pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
        sys.modules[PACK] = pkg
    return sys.modules[PACK]


def on_ui_tabs():
    _pack()
    tab = importlib.import_module(f"{PACK}.vdu_webui.tab")
    return [(tab.build(), "Unlearn", "vdu_unlearn")]


script_callbacks.on_ui_tabs(on_ui_tabs, name="vdu-unlearn")
