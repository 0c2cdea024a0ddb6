"""The mini world's blank, noise and content-kept metrics, on rendered images with known answers."""

import numpy as np
import pytest
import torch

from benchmarks import world_eval
from benchmarks.world_eval import Cell, content_kept, is_blank, is_noise
from miniworld import EVALUATOR_DIR, MODEL_DIR, dataset
from miniworld.evaluator import Evaluator, classify_background, classify_colour


def _render(shape, colour, background="grey", seed=0):
    img = dataset.render(shape, colour, "large", background, np.random.default_rng(seed))
    return torch.from_numpy(img).permute(2, 0, 1)


def _backgrounds(n, seed=0):
    """Shapeless backgrounds made as `dataset.render` makes them: a grey of jittered brightness
    with grey texture."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        grey = list(dataset.BACKGROUNDS.values())[i % len(dataset.BACKGROUNDS)] + rng.uniform(-0.05, 0.05)
        out.append(np.clip(grey + rng.normal(0, 0.015, (1, 32, 32)), 0, 1))
    return torch.from_numpy(np.stack(out)).float().expand(-1, 3, -1, -1)


def _noise(n):
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(0))


def _desaturated(shape, colour, background):
    """A grey shape: a rendered one with each pixel's colour replaced by its channels' mean."""
    return _render(shape, colour, background).mean(0, keepdim=True).expand(3, -1, -1)


def test_every_dataset_image_has_a_shape_and_no_noise():
    x = dataset.to_tensor(dataset.generate(600, seed=21))
    assert not any(is_blank(x)) and not any(is_noise(x))


def test_backgrounds_are_blank_and_uniform_noise_is_noise():
    flat = torch.stack([torch.full((3, 32, 32), v) for v in (0.0, 0.5, 1.0)])
    textured = _backgrounds(30)
    assert all(is_blank(flat)) and all(is_blank(textured))
    assert not any(is_noise(flat)) and not any(is_noise(textured))
    noise = _noise(30)
    assert all(is_noise(noise)) and not any(is_blank(noise))


def test_a_grey_shape_is_not_blank_though_it_has_no_colour():
    grey = torch.stack([_desaturated("circle", "red", "black"), _desaturated("square", "blue", "white")])
    assert classify_colour(grey) == ["none", "none"]
    assert is_blank(grey) == [False, False] and is_noise(grey) == [False, False]


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(EVALUATOR_DIR)


def test_content_kept_of_a_colour_is_the_shape_drawn(evaluator):
    # every image answers "a large red circle on a grey background"
    images = torch.stack([_render("circle", "blue"), _render("circle", "red"), _render("square", "blue"),
                          _backgrounds(1)[0], _noise(1)[0]])
    cells = [Cell(dataset.prompt("circle", "red"), "circle", "red")] * len(images)
    assert content_kept("red", images, cells, evaluator) == [True, True, False, False, False]


def test_content_kept_of_a_shape_is_the_colour_drawn(evaluator):
    # every image answers "a large red circle on a grey background"
    images = torch.stack([_render("square", "red"), _render("circle", "red"), _render("square", "blue"),
                          _desaturated("circle", "red", "black"), _backgrounds(1)[0], _noise(1)[0]])
    cells = [Cell(dataset.prompt("circle", "red"), "circle", "red")] * len(images)
    assert content_kept("circle", images, cells, evaluator) == [True, True, False, False, False, False]


def test_background_is_read_from_the_pixels():
    x = dataset.to_tensor(dataset.generate(600, seed=22))
    assert classify_background(x) == [s.background for s in dataset.generate(600, seed=22)]
    # the grey nearest the median pixel, whatever the shape's colour: the largest shape covers under half the image
    big = [_render(s, c, b) for s, c, b in [("square", "yellow", "black"), ("circle", "blue", "white"),
                                             ("triangle", "purple", "grey")]]
    assert classify_background(torch.stack(big)) == ["black", "white", "grey"]


def test_forgetting_a_background_keeps_shape_and_colour_and_checks_it_on_the_others(evaluator):
    """A background concept (white): it shows where the background is white; content kept is the shape and
    colour asked; the neighbour's and retained prompts are right only on their own background."""
    cell = Cell(dataset.prompt("circle", "red", background="white"), "circle", "red", "white")
    images = torch.stack([_render("circle", "red", "white"), _render("circle", "red", "black"),
                          _render("square", "red", "grey"), _render("circle", "blue", "black"), _backgrounds(1)[0]])
    assert world_eval.shows("white", images, evaluator.classify_shape(images)) == [True, False, False, False, False]
    assert content_kept("white", images, [cell] * len(images), evaluator) == [True, True, False, False, False]
    grey = Cell(dataset.prompt("circle", "red", background="grey"), "circle", "red", "grey")
    shapes, colours = evaluator.classify(images[:3])
    assert world_eval.accurate("white", images[:3], shapes, colours, [grey] * 3) == [False, False, False]
    assert world_eval.accurate("white", images[1:2], shapes[1:2], colours[1:2], [grey]) == [False]
    right = torch.stack([_render("circle", "red", "grey")])
    assert world_eval.accurate("white", right, *evaluator.classify(right), [grey]) == [True]
    # a colour or shape concept's accuracy leaves the background out, as it always has
    assert world_eval.accurate("red", images[1:2], shapes[1:2], colours[1:2], [grey]) == [True]


def test_a_background_concepts_prompt_sets_differ_only_by_background():
    sets = world_eval.prompt_sets("white")
    assert sets["synonym"] == []  # the world has no other word for a background
    assert {c.background for c in sets["forget"]} == {"white"} and all("white background" in c.prompt
                                                                      for c in sets["forget"])
    assert {c.background for c in sets["neighbour"]} == {"grey"}
    assert {c.background for c in sets["retain"]} == {"black"}
    assert len(sets["forget"]) == len(dataset.SHAPES) * len(dataset.COLOURS) * len(dataset.SIZES)
    assert {s.background for s in dataset.generate(20, backgrounds=["white"])} == {"white"}
    assert world_eval.forget_images("white", 8).captions[0].endswith("on a white background")


def test_evaluate_reports_content_blank_and_noise_shares(evaluator):
    from vdu_engine import DiffusersBackend
    metrics = world_eval.evaluate(DiffusersBackend.load(MODEL_DIR, device="cpu"), evaluator, "red", 4)["metrics"]
    sets = ("", "synonym_", "neighbour_", "retain_")
    assert set(metrics) == {"forget_rate", "synonym_forget_rate", "content_kept", "synonym_content_kept",
                            "neighbour_acc", "retain_acc", "neighbour_shows_concept", "retain_shows_concept",
                            *(f"{s}{k}" for s in sets for k in ("blank_share", "noise_share"))}
    # the model as trained draws a shape for every prompt, and red only where a prompt names it
    assert all(metrics[f"{s}{k}"] == 0 for s in sets for k in ("blank_share", "noise_share"))
    assert metrics["neighbour_shows_concept"] == 0 and metrics["retain_shows_concept"] == 0
    assert metrics["forget_rate"] == 1
    assert 0 <= metrics["content_kept"] <= 1


def test_cells_breakdown_groups_samples_by_size_and_background():
    """benchmarks.cells: each sample lands in its prompt's size and background, and a group's two
    shares are its share right and its share drawn as the concept, in percent."""
    from benchmarks.cells import background_of, by, size_of
    small = Cell(dataset.prompt("circle", "red", "small", "white"), "circle", "red")
    large = Cell(dataset.prompt("circle", "red", "large", "black"), "circle", "red")
    assert (size_of(small), background_of(small)) == ("small", "white")
    assert (size_of(large), background_of(large)) == ("large", "black")
    rows = [(small, True, True), (small, False, False), (small, False, True), (small, True, False),
            (large, True, False)]
    assert by(rows, size_of) == {"large": "100 / 0", "small": "50 / 50"}
    assert by(rows, background_of) == {"black": "100 / 0", "white": "50 / 50"}


def test_cells_report_breaks_the_other_sets_down_by_what_was_asked(capsys):
    """benchmarks.cells.report: a shape concept's retain set is broken down by the shape asked (the
    shape it damages), a colour concept's by the colour asked."""
    from benchmarks.cells import report
    square = Cell(dataset.prompt("square", "red", "large", "white"), "square", "red")
    triangle = Cell(dataset.prompt("triangle", "blue", "small", "grey"), "triangle", "blue")
    rows = [(square, False, True, "red", "circle"), (square, True, False, "red", "square"),
            (triangle, True, False, "blue", "triangle")]
    report("circle", {"retain": rows})
    assert "per shape asked: {'square': '50 / 50', 'triangle': '100 / 0'}" in capsys.readouterr().out
    report("red", {"retain": rows})
    assert "per colour asked: {'blue': '100 / 0', 'red': '50 / 50'}" in capsys.readouterr().out


def test_the_report_shows_a_dash_where_the_world_has_no_synonym():
    from benchmarks import quality
    row = {"forget_rate": 0.0, "content_kept": 0.7, "neighbour_acc": 0.66, "retain_acc": 0.69, "seconds": 1, "steps": 2}
    md = quality.markdown({"samples_per_cell": 8, "machine": "2 CPU cores", "concepts": {"white": {"vdu": row}}})
    assert "| vdu | 0.0% | – | 70.0% | 0.0% / 0.0% | 66.0% | 69.0% | nan | 1 | 2 |" in md
