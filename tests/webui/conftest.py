"""The WebUI suites (test_a1111.py, test_forge.py) run only in a WebUI's own venv against its
checkout (`make test` prepares both with tools/setup_webui.sh). Elsewhere — the engine's
`pytest tests` — each module skips itself, saying why (webui_harness.require); nothing here
imports a WebUI."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
