"""A small world where unlearning can be measured: procedural captioned images, a mini Stable
Diffusion trained on them from scratch, and an evaluator for generated images."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "miniworld"  # python -m miniworld.train --out models/miniworld
EVALUATOR_DIR = ROOT / "models" / "miniworld_evaluator"  # python -m miniworld.train_evaluator --out ...
