"""`benchmarks.speed --vs-trainlora` runs end to end in a real ComfyUI (quick settings): our Unlearn
node and ComfyUI's own TrainLoraNode on the same checkpoint, and the two ratios at the top of
speed.json. Numbers are not asserted: they are the benchmark's output."""

import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_harness import comfy_path

ROOT = Path(__file__).resolve().parents[1]


def test_side_by_side_with_trainlora_writes_its_ratios(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path()))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--vs-trainlora", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert list(report)[:2] == ["comfy_vs_trainlora_step_ratio", "comfy_vs_trainlora_peak_memory_ratio"]
    rows = report["comfy_side_by_side"]["rows"]
    assert len(rows) == 3 and all(r["seconds_per_step"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert all(r["steps_timed"] >= 2 for r in rows.values())
    assert "TrainLoraNode" in (tmp_path / "speed.md").read_text()
