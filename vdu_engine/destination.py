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
  circle", each caption always with the same neighbour), so the concept's prompts draw the rest of
  what they ask in one of the concept's alternatives;
- `auto` (the default): `remove`, checked. A model trained on captions that always name the
  concept's kind (every image has a colour) falls back on a default when the word is missing; when
  that default is the concept ("a circle" drawn red), c⁻ would hold the concept in place. Whether
  the concept is still there is asked of the frozen model itself, as a diffusion classifier
  (`neighbours.concept_share`). If it is, c⁻ is drawn again away from c, as users of Stable
  Diffusion steer away from what they do not want: c is the negative prompt, classifier-free
  guidance ε(c) + w (ε(c⁻) − ε(c)) in place of ε(∅) + w (ε(c⁻) − ε(∅)). What c and c⁻ share (the
  rest of the caption) is in both terms; what the concept adds is pushed away. If the check still
  finds the concept, the destination is dropped (the run forgets with the plasticity inducer and
  the stability terms alone). Drawing away is not the first choice: where c⁻ is already free of
  the concept it changes more than the concept (on the mini model circle's prompts lost their
  colours, docs/quality/tuning.md, 2026-12-04). The neighbours are not taken instead either: on the
  mini model they forget red no further and lose the shapes red's prompts ask for (2026-12-03).
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
    share: Optional[float] = None  # the check's share of these images still showing the concept (None: not checked)
    away: bool = False  # drawn with the caption naming the concept as the negative prompt
    plain_share: Optional[float] = None  # with `away`: the check's share for c⁻ drawn plainly


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
    names the concept); mode "dropped" when the auto mode's check finds the concept still drawn for c⁻,
    drawn plainly and drawn away from c."""
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
    if not (cfg.destination_mode == "auto" and not cfg.anchor and cfg.destination_check and run.vicinity.neighbours):
        return dest
    dest.share = _check(run, dest)
    if dest.share <= SHOWS_CONCEPT_SHARE:
        return dest
    # The model falls back on the concept when its word is missing: draw c⁻ away from c instead.
    away = _draw(run, sources, mode, away=True)
    away.share, away.plain_share = _check(run, away), dest.share
    if away.share > SHOWS_CONCEPT_SHARE:
        return Destination(None, [], [], "dropped", away.share, plain_share=dest.share)
    return away


def _draw(run, sources: List[int], mode: str, away: bool = False) -> Destination:
    """The frozen model's images for the sources' destination prompts; with `away`, each drawn with
    its caption naming the concept as the negative prompt."""
    prompts = destination_prompts(run, sources, mode)
    negative = [run.all_captions[i] for i in sources] if away else ""
    with torch.no_grad(), run.network.disabled():
        latents = ddim_latents(run.backend, prompts, run.cfg.seed + 20_000, run.cfg.sample_steps, run.cfg.guidance,
                               run.resolution, negative=negative)
    return Destination(latents, sources, prompts, mode, away=away)


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
    plain = "" if dest.plain_share is None else f"drawn plainly {dest.plain_share:.0%}, "
    if dest.mode == "dropped":
        return (f"false: the caption without the concept still draws it ({plain}drawn away from the concept "
                f"{dest.share:.0%} of checked images)")
    found = "" if dest.share is None else f" (it draws the concept in {plain}{dest.share:.0%} of checked images)"
    what = {"remove": "the caption without the concept", "anchor": "the anchor",
            "neighbours": "the captions with a neighbour in the concept's place"}[dest.mode]
    return what + (", drawn away from the concept's caption" if dest.away else "") + found
