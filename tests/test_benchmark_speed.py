"""The speed benchmark runs end to end (quick mode: mini model, few steps) and writes its report;
the --gpu-full path runs too, on the CPU with a test-size model. Numbers are not asserted here:
they are the benchmark's output, not a test's."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_run_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--out", str(tmp_path),
                           "--gpu-full", "--device", "cpu", "--gpu-kinds", "tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert list(report)[0] == "vdu_vs_lora_step_ratio" and report["vdu_vs_lora_step_ratio"] > 0
    mini = report["models"]["mini"]
    assert set(mini["seconds_per_step"]) == {"lora (peft)", "vdu", "vdu (no replay)", "vdu (replay batch 1)",
                                             "vdu (isotropic prior)",
                                             "esd", "score_align", "gradient_ascent"}
    assert all(v > 0 for v in mini["seconds_per_step"].values())
    assert {"lora (peft), fp32", "vdu, low preset"} <= set(report["memory"])
    assert all(r["peak_rss_mb"] > 0 for r in report["memory"].values())
    assert set(report["scaling"]) == {"forget images", "rank", "resolution", "layers"}
    tiny = report["gpu_full"]["models"]["tiny"]
    assert set(tiny["presets"]) == {"fast", "balanced", "low"} and tiny["step_tflop"] > 0
    md = (tmp_path / "speed.md").read_text()
    assert "VDU step / plain peft LoRA step" in md and "| vdu |" in md
    assert (tmp_path / "speed_scaling.png").stat().st_size > 10_000
