"""The destination in the text encoder (text_remap.py): which word the concept is read as, and that a delta
trained on random word sequences reads it so in sentences it never saw, leaving other sentences alone."""

from types import SimpleNamespace

import torch

from test_neighbours import WORDS, PromptModel
from vdu_engine import DiffusersBackend, UnlearnConfig, text_remap
from vdu_engine.backend import AdaptTarget
from vdu_engine.neighbours import Vicinity


class PromptModelWithText(PromptModel):
    """PromptModel with one text-encoder layer to adapt, so the remap is possible."""

    def targets(self):
        return [AdaptTarget("lora_te_layer", "te1", "layer", torch.nn.Linear(3, 3))]


class PromptModelUNetOnly(PromptModel):
    """A host that exposes only UNet layers (the WebUIs' backends today)."""

    def targets(self):
        return [AdaptTarget("lora_unet_layer", "unet", "layer", torch.nn.Linear(3, 3))]


def _run(backend, captions, **cfg):
    return SimpleNamespace(cfg=UnlearnConfig(**cfg).validate(), backend=backend, captions=captions,
                           latents=torch.zeros(len(captions), 3, 2, 2), vicinity=Vicinity(), timings={})


def test_the_destination_is_the_word_whose_swap_moves_the_prediction_furthest_from_the_concept(monkeypatch):
    monkeypatch.setattr(text_remap.destination, "plan", lambda run: None)  # the UNet's destination: c⁻ (no word)
    run = _run(PromptModelWithText(), ["a red circle"] * 4, concept="red")
    destination, words, why = (lambda p: (p.destination, p.words, p.why))(text_remap.plan(run))
    # By hand (ε = the sum of the words' vectors): removing red moves it by |red|² = 1 (per element: 1/3);
    # crimson by 0.0029 (a synonym), orange by 0.58, blue by 2: blue is furthest; "a" and "circle" are the
    # captions' own words, no candidates.
    e = {w: torch.tensor(x) for w, x in WORDS.items()}
    ratios = {w: ((e[w] - e["red"]).pow(2).sum() / e["red"].pow(2).sum()).item() for w in ("orange", "blue")}
    assert max(ratios, key=ratios.get) == destination == "blue"
    assert words == ["red", "crimson"]  # the synonym is read as the destination too
    assert f"{ratios['blue']:.2f}" in why
    assert set(run_near := text_remap.plan(run).near) >= {"blue", "orange"} and "red" not in run_near  # held


def test_where_the_unets_destination_is_the_nearest_neighbour_the_text_encoder_takes_it_too(monkeypatch):
    """The mini model draws "a large circle" red, so red's destination is its nearest neighbour, orange: a
    word, which the remap can read red as (blue would move red prompts further but draws small shapes worse)."""
    from vdu_engine.destination import Destination
    usual = Destination(torch.zeros(1), [0], ["a orange circle"], "neighbours", share=0.8, neighbour="orange")
    monkeypatch.setattr(text_remap.destination, "plan", lambda run: usual)
    got = text_remap.plan(_run(PromptModelWithText(), ["a red circle"] * 4, concept="red"))
    assert got.destination == "orange" and "nearest neighbour" in got.why and "80%" in got.why
    asked = Destination(torch.zeros(1), [0], ["a orange circle"], "neighbours", neighbour="orange")  # not checked
    monkeypatch.setattr(text_remap.destination, "plan", lambda run: asked)  # --destination-mode neighbours
    got = text_remap.plan(_run(PromptModelWithText(), ["a red circle"] * 4, concept="red"))
    assert got.destination == "orange" and "%" not in got.why


def test_the_anchor_is_the_destination_when_it_is_one_word_and_no_remap_otherwise():
    model = PromptModelWithText()
    given = text_remap.plan(_run(model, ["a red circle"], concept="red", anchor="orange"))
    assert (given.destination, given.words) == ("orange", ["red"])
    two = text_remap.plan(_run(model, ["a red circle"], concept="red", anchor="an orange"))
    assert two.destination is None and "anchor" in two.why and "one word" in two.why


def test_the_word_alone_is_read_as_the_nearest_word_the_model_draws_differently():
    """Captions holding nothing but the concept show no context that would tell the words of its kind from
    the rest: d is the word nearest to it (cosine, the embedding table) that the frozen model does not draw
    as it. By hand: crimson is nearest (cos 0.999) but a synonym (ratio 0.0029, under 0.2); orange is next
    (cos 0.71) with ratio 0.58, the distance |orange − red|² over |red|² (c⁻ is the empty prompt here)."""
    alone = text_remap.plan(_run(PromptModelWithText(), ["red", "red"], concept="red"))
    assert (alone.destination, alone.words) == ("orange", ["red", "crimson"]) and "alone" in alone.why


def test_no_remap_where_the_model_or_the_host_cannot_tell():
    model = PromptModelWithText()
    unknown = text_remap.plan(_run(model, ["a magenta circle"], concept="magenta"))
    assert unknown.destination is None and "vocabulary" in unknown.why
    no_layer = text_remap.plan(_run(PromptModelUNetOnly(), ["a red circle"], concept="red"))
    assert no_layer.destination is None and "layer" in no_layer.why


def test_each_random_sequence_holds_exactly_one_remapped_word_at_a_random_place():
    g = torch.Generator().manual_seed(0)
    seqs = text_remap.sequences(g, ["a", "of", "dog"], ["red", "crimson"], 200, 6)
    assert all(sum(w in ("red", "crimson") for w in s) == 1 for s in seqs)
    assert {len(s) for s in seqs} == set(range(1, 8))  # 0..6 context words, and the inserted one
    assert len({s.index(next(w for w in s if w in ("red", "crimson"))) for s in seqs}) == 7  # every place
    assert not any("red" in s for s in text_remap.sequences(g, ["a", "of"], [], 50, 6))


def test_a_vdu_run_on_the_text_encoder_reads_the_concept_as_its_destination_in_sentences_it_never_saw(
        tiny_sd1, fast_config):
    from vdu_engine import unlearn
    backend = DiffusersBackend.load(tiny_sd1, device="cpu")
    cfg = fast_config(concept="red", anchor="blue", forget_prompts=["a photo of the red dog"])
    result = unlearn(backend, cfg)
    assert all(k.startswith("lora_te_") for k in result.lora)  # the UNet is left as it was
    assert result.metadata["vdu_text_destination"].startswith("red read as 'blue' (the anchor)")
    assert result.metadata["vdu_destination_used"] == "in the text encoder (vdu_text_destination)"
    assert result.summary().startswith("where the concept goes: red read as 'blue' (the anchor)")
    named, moved, other = "the cat of a red square on the dog", "the cat of a blue square on the dog", "a green cat"
    with torch.no_grad():
        frozen_named, goal, frozen_other = (backend.encode_text([p])["context"] for p in (named, moved, other))
        with result.network.attached():
            after_named, after_other = (backend.encode_text([p])["context"] for p in (named, other))
    gap = (frozen_named - goal).pow(2).mean()
    assert (after_named - goal).pow(2).mean() < 0.15 * gap  # read as "blue", in a sentence never trained on
    assert (after_other - frozen_other).pow(2).mean() < 0.05 * gap  # a sentence without it stays as it was


def test_without_the_text_destination_the_run_trains_the_unet(tiny_sd1, fast_config):
    from vdu_engine import unlearn
    backend = DiffusersBackend.load(tiny_sd1, device="cpu")
    off = unlearn(backend, fast_config(concept="red", anchor="blue", text_destination=False))
    assert all(k.startswith("lora_unet_") for k in off.lora) and off.metadata["vdu_text_destination"] == "off"
    assert off.metadata["vdu_destination_used"] == "the anchor"
    phrase = unlearn(backend, fast_config())  # "a red circle" is no one word: the UNet carries it
    assert all(k.startswith("lora_unet_") for k in phrase.lora)
    assert "not one word" in phrase.metadata["vdu_text_destination"]


def test_the_summary_says_a_word_given_alone_was_a_guess_and_how_to_choose_it():
    from vdu_engine.train import UnlearnResult
    guessed = UnlearnResult({}, {"vdu_text_destination": "white read as 'green' (the nearest word the model draws "
                                 "differently from it (the captions hold the concept alone)); 0.36% of the gap left",
                                 "vdu_destination_used": "in the text encoder (vdu_text_destination)",
                                 "vdu_synonyms_found": "", "vdu_neighbours_held": "green, blue"})
    assert guessed.summary() == ("where the concept goes: white read as 'green' (the nearest word the model draws "
                                 "differently from it (the captions hold the concept alone)); it was given alone, so "
                                 "that word is a guess: if it is not of the concept's kind, give an anchor or prompts "
                                 "that use the concept; held: green, blue")
    unet = UnlearnResult({}, {"vdu_text_destination": "off", "vdu_destination_used": "the caption without the concept",
                              "vdu_synonyms_found": "crimson", "vdu_neighbours_held": "orange"})
    assert unet.summary() == ("where the concept goes: the caption without the concept; forgotten with it: crimson; "
                              "held: orange")
