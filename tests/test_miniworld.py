"""The mini world: dataset generator, tokenizer, the committed model and evaluator, one quick
benchmark cell."""

import json

import numpy as np
import pytest
import torch

from miniworld import EVALUATOR_DIR, MODEL_DIR, dataset
from miniworld.evaluator import Evaluator, classify_colour, colour_area, frechet_distance


def test_generator_is_deterministic_and_labels_match_captions():
    a, b = dataset.generate(50, seed=3), dataset.generate(50, seed=3)
    assert all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, dataset.generate(1, seed=4)[0].image)
    for s in a:
        words = s.caption.split()
        assert s.size in words and s.background in words
        assert s.colour in words or any(w in words for w in dataset.SYNONYMS.get(s.colour, []))
        assert s.shape in words or any(w in words for w in dataset.SYNONYMS.get(s.shape, []))
        assert s.image.shape == (32, 32, 3) and 0 <= s.image.min() and s.image.max() <= 1


def test_exclusion_and_synonyms():
    samples = dataset.generate(400, seed=1, exclude={"colour": "red"})
    assert not any(s.colour == "red" for s in samples)
    assert not any(w in s.caption for s in samples for w in ("red", "crimson", "scarlet"))
    with_red = dataset.generate(2000, seed=1, colours=["red"])
    words = {w for s in with_red for w in s.caption.split()}
    assert {"red", "crimson", "scarlet", "disc", "circle"} <= words
    assert not any(s.shape == "circle" for s in dataset.generate(400, seed=2, exclude={"shape": "circle"}))


def test_colour_is_measured_from_the_pixels():
    samples = dataset.generate(600, seed=11)
    predicted = classify_colour(dataset.to_tensor(samples))
    assert sum(p == s.colour for p, s in zip(predicted, samples)) / len(samples) >= 0.98
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert classify_colour(grey) == ["none"]
    # A red patch in a noisy multicoloured image still shows red, though its mean hue is not red.
    noisy = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    noisy[:, :, :8, :8] = torch.tensor([0.9, 0.05, 0.05]).view(1, 3, 1, 1)
    assert colour_area(noisy, "red")[0] >= 64 and colour_area(grey, "red") == [0]


def test_tokenizer_covers_every_word_distinctly():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    seqs = {w: tuple(tok(w).input_ids[1:-1]) for w in dataset.vocabulary()}
    assert all(seqs.values()) and tok.unk_token_id not in {i for s in seqs.values() for i in s}
    assert len(set(seqs.values())) == len(seqs)  # no two words read the same
    assert sum(len(s) == 1 for s in seqs.values()) >= len(seqs) // 2


def test_committed_model_loads_offline_and_samples():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True, safety_checker=None)
    out = pipe("a large red circle on a grey background", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    files = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert files <= 20 * 2 ** 20


def test_committed_model_follows_its_prompts():
    """Floors under the measured prompt following (README: colour 100.0 %, shape 69.8 % over 192
    samples), so a retrained or damaged model that stops doing what its prompts say fails. The
    previous model (shape 50 %, squares 12.5 %) would fail the shape floors."""
    from benchmarks.world_eval import prompt_following
    from vdu_engine import DiffusersBackend
    scores = prompt_following(DiffusersBackend.load(MODEL_DIR, device="cpu"), Evaluator(EVALUATOR_DIR), 48)
    assert scores["colour_acc"] >= 0.9 and scores["shape_acc"] >= 0.6
    assert scores["shape_acc_circle"] >= 0.8 and scores["shape_acc_ellipse"] >= 0.7
    assert scores["shape_acc_square"] + scores["shape_acc_triangle"] >= 0.6


def test_evaluator_shape_accuracy_floor():
    ev = Evaluator(EVALUATOR_DIR)
    held = dataset.generate(500, seed=4242)
    shapes = ev.classify_shape(dataset.to_tensor(held))
    assert sum(p == s.shape for p, s in zip(shapes, held)) / len(held) >= 0.95
    assert json.loads((EVALUATOR_DIR / "evaluator.json").read_text())["held_out_shape_accuracy"] >= 0.95
    # Generated images have soft edges: a 1-pixel blur must not change what the shape is.
    from miniworld.train_evaluator import blur
    x = dataset.to_tensor(held)
    blurred = ev.classify_shape(blur(x, torch.full((len(x),), 1.0)))
    assert sum(p == s.shape for p, s in zip(blurred, held)) / len(held) >= 0.95


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    torch.manual_seed(0)
    a = torch.randn(400, 8)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.05)


def test_one_quick_benchmark_cell(tmp_path):
    from benchmarks import quality
    quality.main(["--out", str(tmp_path), "--concepts", "red", "--samples", "8", "--forget-images", "8",
                  "--steps", "2", "--seeds", "2", "--no-retrained", "--cache", str(tmp_path / "cache")])
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["training_seeds"] == 2 and report["baseline_seeds"] == 1
    rows = report["concepts"]["red"]
    assert {"original", "vdu (8 images)", "vdu (prompt)", "uce (8 images' captions)"} <= set(rows)
    for baseline in ("gradient_ascent (8 images", "esd (8 images", "score_align (8 images"):  # each one's best grid row
        assert sum(n.startswith(baseline) and n.endswith(f"(best of {len(quality.BASELINE_GRID)})") for n in rows) == 1
        assert len([n for n in report["baseline_grids"]["red"][baseline.split()[0]]]) == len(quality.BASELINE_GRID)
    for r in rows.values():
        assert set(quality.KEYS) <= set(r) and 0 <= r["forget_rate"] <= 1
    assert (tmp_path / "quality.md").exists() and (tmp_path / "grid_red.png").exists()
    # --only re-measures the rows it names and keeps the rest of the report, baselines and their grids
    before = json.loads((tmp_path / "quality.json").read_text())
    quality.main(["--out", str(tmp_path), "--concepts", "red", "--samples", "8", "--forget-images", "8",
                  "--steps", "1", "--seeds", "2", "--no-retrained", "--cache", str(tmp_path / "cache"),
                  "--only", "vdu (prompt)"])
    after = json.loads((tmp_path / "quality.json").read_text())
    assert list(after["concepts"]["red"]) == list(rows)
    assert after["concepts"]["red"]["vdu (prompt)"]["steps"] == 1  # measured again, at the new setting
    assert {k: v for k, v in after["concepts"]["red"].items() if k != "vdu (prompt)"} == \
        {k: v for k, v in before["concepts"]["red"].items() if k != "vdu (prompt)"}
    assert after["baseline_grids"] == before["baseline_grids"]


def test_demo_writes_its_lora_grid_and_numbers(tmp_path, capsys):
    from benchmarks import demo
    from safetensors import safe_open
    demo.main(["--out", str(tmp_path), "--samples", "8", "--steps", "3"])
    out = capsys.readouterr().out
    assert "forget rate (red)" in out and "orange accuracy" in out and "orange drawn red" in out
    assert "where the concept goes: red" in out and "read as 'orange'" in out and "\n  held: " in out
    with safe_open(str(tmp_path / "forget-red.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["vdu_concept"] == "red" and meta["vdu_keep"] == ""  # nothing named to keep
        assert "orange" in meta["vdu_neighbours_held"].split(", ")  # found by the run itself
    assert (tmp_path / "before_after.png").exists()


def test_reference_rows_are_cached_by_model_code_and_settings(tmp_path):
    from benchmarks import quality, world_eval
    evaluator, cells = Evaluator(EVALUATOR_DIR), quality.grid_cells("red")[:2]
    real = world_eval.real_images("red", 4)
    first = quality.reference_row(MODEL_DIR, "red", cells, 4, evaluator, real, tmp_path, fresh=False)
    files = list((tmp_path / "quality_rows").iterdir())
    assert len(files) == 1
    again = quality.reference_row(MODEL_DIR, "red", cells, 4, evaluator, real, tmp_path, fresh=False)
    assert again[0] == first[0] and torch.equal(again[1], first[1])
    quality.reference_row(MODEL_DIR, "red", cells, 5, evaluator, world_eval.real_images("red", 5), tmp_path,
                          fresh=False)
    assert len(list((tmp_path / "quality_rows").iterdir())) == 2  # other settings, another entry


def test_vae_roundtrip_and_sweep_side_runs(tmp_path, capsys):
    from benchmarks import sweep
    from benchmarks.world_eval import vae_roundtrip
    from vdu_engine import DiffusersBackend
    kept = vae_roundtrip(DiffusersBackend.load(MODEL_DIR, device="cpu"), Evaluator(EVALUATOR_DIR), 64)
    assert set(kept) == set(dataset.SHAPES) and kept["circle"] >= 0.8 and kept["ellipse"] >= 0.8
    sweep.main(["--samples", "8", "--images", "8", "--cache", str(tmp_path), "--colours", "base",
                '{"steps": 2, "text_steps": 2}'])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "forget_rate=" in ln]
    assert len(lines) == 2 and lines[0].startswith("base") and "steps=2" in lines[1]
    assert "neighbour_colours={'orange': 8}" in lines[0]  # the original draws every orange prompt orange
