"""Shared fixtures: tiny SD 1.x, SD 2.x-v and SDXL models, built once per test session."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {kind: build_tiny(base / kind, kind) for kind in ("sd1", "sd2v", "sdxl")}


@pytest.fixture(scope="session")
def tiny_sd1(tiny_models):
    return tiny_models["sd1"]


@pytest.fixture
def red_images(tmp_path):
    """A small forget folder: solid red-ish pictures of assorted sizes and modes."""
    from PIL import Image
    d = tmp_path / "forget"
    d.mkdir()
    for i in range(4):
        Image.new("RGB", (72 + 8 * i, 64), (220, 20 + 10 * i, 30)).save(d / f"red{i}.png")
    (d / "red0.txt").write_text("a red circle")
    return d


@pytest.fixture
def fast_config(tmp_path):
    """Settings that keep a run to a second or two on the tiny models."""
    from vdu_engine import UnlearnConfig

    def make(**kw):
        base = dict(concept="a red circle", anchor="a blue square", steps=4, num_images=2, batch_size=2,
                    sample_steps=2, fisher_samples=2, resolution=16, cache_dir=str(tmp_path / "cache"))
        base.update(kw)
        return UnlearnConfig(**base)
    return make
