"""Finding the concept's synonyms and neighbours, against hand computations on a model whose
prediction is a known function of the prompt."""

import torch

from vdu_engine.backend import NoiseSchedule
from vdu_engine.neighbours import SYNONYM_RATIO, classify, nearest_words, without, word_pattern
from vdu_engine.train import fisher_prompts
from vdu_engine.config import UnlearnConfig

WORDS = {"red": [1.0, 0.0, 0.0], "crimson": [0.98, 0.05, 0.0], "orange": [0.7, 0.7, 0.0],
         "blue": [0.0, 0.0, 1.0], "circle": [0.0, 1.0, 0.0], "a": [0.1, 0.1, 0.1]}


class PromptModel:
    """ε(x_t, t, c) = the sum of the prompt's word vectors, broadcast over the latent: distances
    between predictions are distances between those sums, which a test can compute by hand."""

    device, dtype = torch.device("cpu"), torch.float32
    schedule = NoiseSchedule(torch.linspace(0.99, 0.01, 1000), "epsilon")

    def encode_text(self, prompts):
        return {"context": torch.stack([sum((torch.tensor(WORDS[w]) for w in p.split()), torch.zeros(3))
                                        for p in prompts])}

    def denoise(self, x_t, t, cond):
        return cond["context"][:, :, None, None].expand(-1, 3, *x_t.shape[2:]) + 0 * x_t[:, :3]

    def vocabulary(self):
        return list(WORDS), torch.tensor(list(WORDS.values()))


def test_nearest_words_rank_by_cosine_and_leave_out_the_concept():
    got = nearest_words(PromptModel(), "red", 2)  # cosines: crimson 0.999, orange 0.707, a 0.577, the rest 0
    assert got == ["crimson", "orange"]
    assert "red" not in got and "a" not in got  # the concept itself and two-letter words are never candidates


def test_classify_splits_by_the_ratio_to_removing_the_concept():
    b = PromptModel()
    captions = ["a red circle"] * 4
    v = classify(b, torch.zeros(4, 3, 2, 2), captions, "red", ["crimson", "orange", "blue"], seed=0, n=4)
    e = {w: torch.tensor(x) for w, x in WORDS.items()}
    removed = (e["red"]).pow(2).mean()  # c − c⁻ = the concept's own vector
    for w in ("crimson", "orange", "blue"):
        hand = (e[w] - e["red"]).pow(2).mean() / removed
        assert abs(v.ratios[w] - hand.item()) < 1e-5, w
    assert v.synonyms == ["crimson"] and v.ratios["crimson"] < SYNONYM_RATIO
    assert v.neighbours == ["orange", "blue"]


def test_a_word_the_text_encoder_overflows_on_is_left_out_of_the_vicinity(caplog):
    """An fp16 text encoder can overflow on some word near the concept (a random CLIP-L in Forge, on "exercise"):
    that word can be neither held nor forgotten, so it is left out, with a warning, and the rest are classified
    as before."""
    class Overflowing(PromptModel):
        def encode_text(self, prompts):
            cond = super().encode_text(prompts)
            cond["context"][[("blue" in p.split()) for p in prompts]] = float("inf")
            return cond
    with caplog.at_level("WARNING", logger="vdu_engine"):
        v = classify(Overflowing(), torch.zeros(4, 3, 2, 2), ["a red circle"] * 4, "red", ["crimson", "orange", "blue"],
                     seed=0, n=4)
    assert v.synonyms == ["crimson"] and v.neighbours == ["orange"] and "blue" not in v.ratios
    assert "'blue'" in caplog.text and "nan/inf" in caplog.text


def test_preservation_prompts_take_synonyms_out_and_neighbours_in():
    caps = ["a red circle", "a crimson circle", "a blue square"]
    got = fisher_prompts(UnlearnConfig(concept="red"), caps, neighbours=["orange"], synonyms=["crimson"])
    assert got == ["", "a circle", "a orange circle"]
    assert without("a Red circle", word_pattern(["red"])) == "a circle"


def test_the_destination_check_sends_a_concept_the_model_falls_back_on_to_its_nearest_neighbour():
    """On the mini model, whose every training caption names a colour, a caption with its colour
    taken out falls back on red: "a large circle" is drawn red, so red's destination (the caption
    without red) would hold red in place. The check, the frozen model's own diffusion classifier on
    images it draws before training, finds red there, and the captions with red's nearest neighbour
    (the smallest prediction change of the vicinity's neighbours) in its place are drawn instead. A
    caption with its shape taken out ("a large blue on a grey background") is drawn as a blue square,
    so circle's destination is kept as drawn."""
    from benchmarks import world_eval
    from miniworld import MODEL_DIR
    from vdu_engine import DiffusersBackend
    from vdu_engine.destination import note, plan
    from vdu_engine.train import Run, frozen
    b = DiffusersBackend.load(MODEL_DIR, device="cpu")

    def planned(concept, check=True, draw=7, images=16):
        cfg = UnlearnConfig(concept=concept, fisher_samples=images, destination_check=check).validate()
        with torch.inference_mode(False), frozen(b):
            run = Run(b, cfg).setup(world_eval.forget_images(concept, 8, seed=draw))
            assert run.vicinity.neighbours, concept
            return run, plan(run)
    (red_run, red), (_, circle), (_, unchecked) = planned("red"), planned("circle"), planned("red", check=False)
    # another 8 circles, whose vicinity holds colour words (their captions explain nothing in a shape's place),
    # at the default 32 destination images: against the median of the vicinity (the check before 2026-12-06)
    # their circle-free images read as circles in 62 % of the first 8 and 71 % of all, and the run fell back on
    # the square, which this model draws round
    _, other_circles = planned("circle", draw=8, images=32)
    ratios = red_run.vicinity.ratios
    nearest = min(red_run.vicinity.neighbours, key=ratios.get)
    assert red.mode == "neighbours" and red.share > 0.5 and red.neighbour == nearest
    swapped = [red_run.concept_words.sub(nearest, red_run.all_captions[s]) for s in red.sources]
    assert red.prompts == swapped
    assert note(red, 1.0).startswith(f"the captions with its nearest neighbour, {nearest!r}, in the concept's place")
    assert len(red.latents) == 16 and not torch.allclose(red.latents, unchecked.latents)
    assert circle.mode == "remove" and circle.share <= 0.5
    assert other_circles.mode == "remove" and other_circles.share <= 0.5
    assert note(circle, 1.0).startswith("the caption without the concept (its images read as the concept, not its "
                                        "nearest neighbour, in")
    assert unchecked.mode == "remove" and unchecked.share is None
    assert note(unchecked, 1.0) == "the caption without the concept"
