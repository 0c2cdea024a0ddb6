"""The destination: what the prompts naming the concept draw once it is forgotten.

The plasticity inducer alone only lowers the likelihood of the forget images, and left alone the
forget prompts drift to noise. The destination gives them somewhere to go, as Concept Ablation
does (Kumari et al., ICCV 2023): the frozen model draws images for destination prompts, and on
those images the adapted model's prediction under the caption naming the concept is pulled to the
frozen model's prediction under the destination prompt. The images are the model's own, so the
pull acts where sampling goes: on images without the concept, at every noise level.

The destination prompt of a caption c naming the concept:
- `remove`: c⁻, c with the concept taken out ("a red circle" → "a circle");
- `neighbours`: c with the concept's nearest neighbour in its place ("an orange circle"): of the
  neighbours the vicinity found (words the frozen model draws differently), the one whose swap
  changes its prediction least. One neighbour for every caption: the deltas are linear in the text
  embeddings, so different neighbours for different captions blend, on prompts between them, into
  a mixture of far-apart concepts, which the model draws as none of them (on the mini model the
  mean of five colours' conditionings loses the shapes, while any blend of red and orange keeps
  them; docs/quality/tuning.md, 2026-12-05);
- `auto` (the default): `remove`, checked. A model trained on captions that always name the
  concept's kind (every image has a colour) falls back on a default when the word is missing; when
  that default is the concept ("a circle" drawn red), c⁻ would hold the concept in place, and its
  images are a prompt the model barely knows (the mini model draws shapes poorly without a colour).
  Whether the concept is still there is asked of the frozen model itself, as a diffusion classifier
  (`neighbours.concept_share`): on each of c⁻'s images, does the caption naming the concept explain
  it better than the same caption with the nearest neighbour in its place? c⁻'s images of "a large
  circle", drawn red, read as red against "a large orange circle"; those of "a large blue", drawn
  as blue squares, read as squares against "a large blue square". If most images read as the
  concept, the nearest neighbour takes its place: a prompt of the kind the model was trained on,
  which by construction does not draw the concept. The question is put against that one word, the
  alternative the run would fall back on, and not against every word the vicinity found: on a
  model whose text encoder does not sort words by kind, those include words of another kind (colours
  beside a shape), whose captions explain nothing and let the concept win by default
  (docs/quality/tuning.md, 2026-12-06).
  It is not the first choice: where c⁻ is free of the concept it is the more generic destination
  (a style's prompts drawn in no particular style, not in the nearest other one), and on the mini
  model circle's prompts, sent to the ellipse, still read as circles in half the samples.
A user's anchor replaces all of these.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional

import torch

from .neighbours import SHOWS_CONCEPT_SHARE, concept_share, without, word_pattern
from .sampling import ddim_latents


@dataclass
class Destination:
    latents: torch.Tensor  # the frozen model's images for the destination prompts
    sources: List[int]  # per image: index (in run.all_captions) of the caption naming the concept it trains
    prompts: List[str]  # per image: the destination prompt it was drawn for
    mode: str  # remove | neighbours | anchor
    share: Optional[float] = None  # the check's share of c⁻ images still showing the concept (None: not checked)
    neighbour: str = ""  # in neighbours mode: the word in the concept's place

    @property
    def guidance(self) -> bool:
        """Whether the goal is guided away from the concept (η, `anchor_guidance`). Not for a neighbour: its
        prompt does not draw the concept, and pushing past it leaves what the model draws (red prompts pushed
        past orange lost their shapes, docs/quality/tuning.md, 2026-12-05)."""
        return self.mode != "neighbours"


def destination_prompts(run, sources: List[int], mode: str) -> List[str]:
    """One destination prompt per source caption (see the module's docstring)."""
    caps = [run.all_captions[i] for i in sources]
    if mode == "anchor":
        return [run.cfg.anchor] * len(caps)
    if mode == "remove":
        return [without(c, run.concept_words) for c in caps]
    return [run.concept_words.sub(nearest_neighbour(run.vicinity), c) for c in caps]


def nearest_neighbour(vicinity) -> str:
    """The neighbour whose swap into the concept's place changes the frozen model's prediction least."""
    return min(vicinity.neighbours, key=lambda w: vicinity.ratios.get(w, float("inf")))


def plan(run) -> Optional[Destination]:
    """The destination's images for this run; None when it has none (its weight is 0, or no caption
    names the concept). In auto mode, the nearest neighbour's when the check finds c⁻ still drawing the concept."""
    cfg = run.cfg
    if cfg.destination <= 0 or run.concept_words is None:
        return None
    named = [i for i, c in enumerate(run.all_captions) if run.concept_words.search(c) and c not in run.prefixes]
    if not named:
        return None
    # As many images as the model draws for its preservation prompts (--fisher-samples), over the captions.
    sources = [named[i % len(named)] for i in range(cfg.fisher_samples)]
    mode = "anchor" if cfg.anchor else ("remove" if cfg.destination_mode == "auto" else cfg.destination_mode)
    if mode == "neighbours" and not run.vicinity.neighbours:
        mode = "remove"
    dest = _draw(run, sources, mode)
    if not (cfg.destination_mode == "auto" and not cfg.anchor and cfg.destination_check and run.vicinity.neighbours):
        return dest
    share = _check(run, dest)
    if share > SHOWS_CONCEPT_SHARE:  # the model falls back on the concept when its word is missing
        dest = _draw(run, sources, "neighbours")
    dest.share = share
    return dest


def _frozen(run):
    """The frozen model: the run's LoRA off (before the run has one, nothing is attached)."""
    network = getattr(run, "network", None)
    return network.disabled() if network is not None else nullcontext()


def _draw(run, sources: List[int], mode: str) -> Destination:
    """The frozen model's images for the sources' destination prompts."""
    prompts = destination_prompts(run, sources, mode)
    with torch.no_grad(), _frozen(run):
        latents = ddim_latents(run.backend, prompts, run.cfg.seed + 20_000, run.cfg.sample_steps, run.cfg.guidance,
                               run.resolution)
    return Destination(latents, sources, prompts, mode,
                       neighbour=nearest_neighbour(run.vicinity) if mode == "neighbours" else "")


def _check(run, dest: Destination) -> float:
    """The share of c⁻ images in which the frozen model sees the concept rather than its nearest neighbour (over
    every image whose caption names the concept itself, not a synonym)."""
    concept = word_pattern([run.cfg.concept.strip()])
    picked = [i for i, s in enumerate(dest.sources) if concept.search(run.all_captions[s])]
    if not picked:
        return 0.0
    with torch.no_grad(), _frozen(run):
        return concept_share(run.backend, dest.latents[picked], [run.all_captions[dest.sources[i]] for i in picked],
                             run.cfg.concept.strip(), nearest_neighbour(run.vicinity), run.cfg.seed)


def note(dest: Optional[Destination], weight: float) -> str:
    """The run's metadata: which destination trained, and what the check found."""
    if dest is None:
        return "false" if weight <= 0 else "false: no caption names the concept"
    share = "" if dest.share is None else f"{dest.share:.0%} of checked images"
    read = f"its images read as the concept, not its nearest neighbour, in {share}"
    if dest.mode == "remove":
        return "the caption without the concept" + (f" ({read})" if share else "")
    if dest.mode == "neighbours":
        why = f" (the caption without the concept: {read})" if share else ""
        return f"the captions with its nearest neighbour, {dest.neighbour!r}, in the concept's place" + why
    return "the anchor"
