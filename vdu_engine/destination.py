"""The destination: what the prompts naming the concept draw once it is forgotten.

The plasticity inducer alone only lowers the likelihood of the forget images, and left alone the
forget prompts drift to noise. The destination gives them somewhere to go, as Concept Ablation
does (Kumari et al., ICCV 2023): the frozen model draws images for destination prompts, and on
those images the adapted model's prediction under the caption naming the concept is pulled to the
frozen model's prediction under the destination prompt. The images are the model's own, so the
pull acts where sampling goes: on images without the concept, at every noise level.

The destination prompt of a caption c naming the concept:
- `remove`: c⁻, c with the concept taken out ("a red circle" → "a circle");
- `neighbours`: c with one of the concept's neighbours in its place ("an orange circle", "a green
  circle", each caption always with the same neighbour), so the concept's prompts draw the rest of what they ask
  in one of the concept's alternatives;
- `auto` (the default): `remove`, unless the frozen model still draws the concept for c⁻. A model
  trained on captions that always name the concept's kind (every image has a colour) falls back on a
  default when the word is missing; when that default is the concept ("a circle" drawn red), c⁻ would
  hold the concept in place, and the destination is dropped (the run forgets with the plasticity
  inducer and the stability terms alone). Whether the concept is still there is asked of the
  frozen model itself, as a diffusion classifier (`neighbours.concept_share`). The neighbours are
  not taken instead: on the mini model they forget red no further and lose the shapes red's prompts
  ask for (docs/quality/tuning.md, 2026-12-03).
A user's anchor replaces all of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .neighbours import SHOWS_CONCEPT_SHARE, concept_share, without, word_pattern
from .sampling import ddim_latents

CHECK_IMAGES = 8  # of the destination's images, the ones the auto mode's check reads


@dataclass
class Destination:
    latents: Optional[torch.Tensor]  # the frozen model's images for the destination prompts (None: dropped)
    sources: List[int]  # per image: index (in run.all_captions) of the caption naming the concept it trains
    prompts: List[str]  # per image: the destination prompt it was drawn for
    mode: str  # remove | neighbours | anchor | dropped
    share: Optional[float] = None  # the check's share of c⁻ images still showing the concept (None: not checked)


def destination_prompts(run, sources: List[int], mode: str) -> List[str]:
    """One destination prompt per source caption (see the module's docstring)."""
    caps = [run.all_captions[i] for i in sources]
    if mode == "anchor":
        return [run.cfg.anchor] * len(caps)
    if mode == "remove":
        return [without(c, run.concept_words) for c in caps]
    words = run.vicinity.neighbours
    # Each caption takes one neighbour (its index mod K), always the same one: several neighbours'
    # predictions for one caption would average into none of them.
    return [run.concept_words.sub(words[s % len(words)], c) for s, c in zip(sources, caps)]


def plan(run) -> Optional[Destination]:
    """The destination's images for this run; None when it has none (its weight is 0, or no caption
    names the concept); mode "dropped" when the auto mode's check finds the concept still drawn for c⁻."""
    cfg = run.cfg
    if cfg.destination <= 0 or run.concept_words is None:
        return None
    named = [i for i, c in enumerate(run.all_captions) if run.concept_words.search(c)]
    if not named:
        return None
    # As many images as the model draws for its preservation prompts (--fisher-samples), over the captions.
    sources = [named[i % len(named)] for i in range(cfg.fisher_samples)]
    mode = "anchor" if cfg.anchor else ("remove" if cfg.destination_mode == "auto" else cfg.destination_mode)
    if mode == "neighbours" and not run.vicinity.neighbours:
        mode = "remove"
    dest = _draw(run, sources, mode)
    if cfg.destination_mode == "auto" and not cfg.anchor and cfg.destination_check and run.vicinity.neighbours:
        dest.share = _check(run, dest)
        if dest.share > SHOWS_CONCEPT_SHARE:
            return Destination(None, [], [], "dropped", dest.share)
    return dest


def _draw(run, sources: List[int], mode: str) -> Destination:
    prompts = destination_prompts(run, sources, mode)
    with torch.no_grad(), run.network.disabled():
        latents = ddim_latents(run.backend, prompts, run.cfg.seed + 20_000, run.cfg.sample_steps, run.cfg.guidance,
                               run.resolution)
    return Destination(latents, sources, prompts, mode)


def _check(run, dest: Destination) -> float:
    """The share of c⁻ images in which the frozen model sees the concept (over the first CHECK_IMAGES
    whose caption names the concept itself, not a synonym)."""
    concept = word_pattern([run.cfg.concept.strip()])
    picked = [i for i, s in enumerate(dest.sources) if concept.search(run.all_captions[s])][:CHECK_IMAGES]
    if not picked:
        return 0.0
    with torch.no_grad(), run.network.disabled():
        return concept_share(run.backend, dest.latents[picked], [run.all_captions[dest.sources[i]] for i in picked],
                             run.cfg.concept.strip(), run.vicinity.neighbours, run.cfg.seed)


def note(dest: Optional[Destination], weight: float) -> str:
    """The run's metadata: which destination trained, and what the check found."""
    if dest is None:
        return "false" if weight <= 0 else "false: no caption names the concept"
    if dest.mode == "dropped":
        return f"false: the caption without the concept still draws it ({dest.share:.0%} of checked images)"
    found = "" if dest.share is None else f" (it draws the concept in {dest.share:.0%} of checked images)"
    return {"remove": "the caption without the concept", "anchor": "the anchor",
            "neighbours": "the captions with a neighbour in the concept's place"}[dest.mode] + found
