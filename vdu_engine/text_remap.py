"""The destination in the text encoder: the concept's word read as another word, in every context.

The UNet's deltas act on what the text encoder makes of a prompt, and a causal text encoder (CLIP) spells the
concept differently in every context. Deltas learned from a run's captions reach the prompts that share their
wording; prompts in other settings keep some of the concept, and what the deltas move spills onto other prompts
(docs/quality/tuning.md, 2026-12-04 to "Stop 41"). A delta on the text encoder can be taught the word itself,
without its contexts: on sequences of random words from the encoder's own vocabulary, the adapted encoder's output
for a sequence holding the concept (or one of its synonyms) is pulled to the frozen encoder's output for the same
sequence with the destination word d in its place, and every sequence without the concept is held where it was
(`TextVDU`, VDU's loss on the encoder). The contexts are arbitrary and a rank-r delta cannot learn them one by
one, so it learns the word: on the mini models about 1 % of the way from a caption naming the concept to the same
caption naming d is left, on captions it never saw. This is Concept Ablation's anchor (Kumari et al., ICCV 2023)
learned in the encoder, where AdvUnlearn (Zhang et al., NeurIPS 2024) also erases.

The destination word d: the user's anchor when it is one word; else the UNet's destination where that is a word
(destination.py: the nearest neighbour, where the caption without the concept still draws it, as the mini model
draws "a large circle" red). Where the UNet's destination is c⁻, which no word remap can express, the frozen
model chooses among the words nearest to the concept by what it predicts on the concept's own noisy images
(`neighbours.classify`): for each caption, how far swapping the word in moves the prediction from the concept's,
relative to taking the concept out, and d is the word whose smallest such ratio is largest, the one that moves
*every* caption away from the concept. A word of the concept's kind that the model draws as something else does
(circle → triangle: 1.2-2.6 × the removal at the least, on the mini models). A word the model draws like the
concept does not (the mini model's squares, drawn round: 0.1 at the least), nor a word of another kind, which
some caption shrugs off ("a large orange yellow" beside "a large orange circle": 0.2-0.9). That question needs the
concept in context. Captions that hold nothing but the concept (a prompt-only run from its word) say nothing about
which words share its place; there d is the nearest word (by token embedding) that the model draws differently,
which is a word of its kind where the encoder's nearest words are (red → orange on the mini model; the mini model's
circle → "large", which leaves circles drawn: docs/quality/tuning.md, "Stop 42"). Concepts of several words,
without a one-word anchor, train the UNet as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import destination
from .neighbours import SYNONYM_RATIO, caption_words, classify, nearest_words, word_pattern
from .objectives import vdu_loss
from .prior import isotropic_prior

CANDIDATES = 32  # words nearest to the concept whose swaps are measured (the vicinity's own --neighbours, or more)
BATCH = 32  # random sequences with the concept, and as many without it, per step
# The run stops once the destination term is this share of its first value (a convergence tolerance: the share of
# the gap left on the captions is measured and written to the LoRA's metadata).
STOP_SHARE = 0.01
ALONE = "the captions hold the concept alone"  # the reason a word alone's destination gives (UnlearnResult.summary)


@dataclass
class TextPlan:
    """Where the concept goes in the text encoder: `destination` (None: no remap, `why` says why) and the words
    read as it (the concept and the synonyms the frozen model finds)."""

    destination: Optional[str]
    words: List[str]
    why: str
    near: List[str] = field(default_factory=list)  # the words nearest to the concept: held in every plain sequence


def plan(run) -> TextPlan:
    """The remap a run can do (module docstring), or why it cannot."""
    cfg, backend = run.cfg, run.backend
    concept = cfg.concept.strip().lower()
    why_not = _why_not(run, concept)
    if why_not:
        return TextPlan(None, [], "off: " + why_not)
    if cfg.anchor:
        remapped = [concept, *_strict_synonyms(run.vicinity)]
        return TextPlan(cfg.anchor.strip().lower(), remapped, "the anchor",
                        nearest_words(backend, concept, CANDIDATES, remapped))
    exclude = {k.strip().lower() for k in cfg.keep} | caption_words(run.captions, concept)
    candidates = nearest_words(backend, concept, max(CANDIDATES, cfg.neighbours), exclude)
    with torch.no_grad():
        found = classify(backend, run.latents, run.captions, concept, candidates, cfg.seed)
    if not found.neighbours:
        return TextPlan(None, [], "off: no word near the concept is drawn differently from it")
    remapped = [concept, *_strict_synonyms(found)]
    near = nearest_words(backend, concept, CANDIDATES, remapped)
    if _alone(run, concept):  # no context tells the words of its kind: the nearest one drawn otherwise
        why = f"the nearest word the model draws differently from it ({ALONE})"
        return TextPlan(found.neighbours[0], remapped, why, near)
    usual = destination.plan(run)  # the UNet's destination: c⁻, or the nearest neighbour where c⁻ draws the concept
    if usual is not None and usual.mode == "neighbours":
        checked = "" if usual.share is None else f" ({usual.share:.0%} of the checked images)"
        return TextPlan(usual.neighbour, remapped, "the nearest neighbour: without its word the model still draws "
                                                   "the concept" + checked, near)
    best = max(found.neighbours, key=lambda w: found.least[w])
    return TextPlan(best, remapped, f"of the words near it, the one that moves every caption furthest from it: "
                                    f"{found.least[best]:.2f} × the concept's removal at the least", near)


def _why_not(run, concept: str) -> str:
    """Why this run cannot put the destination in the text encoder ("": it can)."""
    cfg, backend = run.cfg, run.backend
    if cfg.destination <= 0:
        return "the destination's weight is 0 (--destination 0)"
    vocab = backend.vocabulary()
    if vocab is None:
        return "this model's text encoder lists no vocabulary"
    if not [t for t in backend.targets() if t.component != "unet"]:
        return "this host exposes no text-encoder layer to adapt yet"
    words = set(vocab[0])
    if concept not in words:
        return f"{concept!r} is not one word of the text encoder's vocabulary"
    if cfg.anchor:
        anchor = cfg.anchor.strip().lower()
        return "" if anchor in words else f"the anchor {anchor!r} is not one word of the text encoder's vocabulary"
    if cfg.neighbours <= 0:
        return "the search for nearby words is off (--neighbours 0) and no anchor is given"
    return ""


def _alone(run, concept: str) -> bool:
    """Whether every caption naming the concept is the concept alone (a prompt-only run from its word)."""
    named = word_pattern([concept])
    return all(c.strip().lower() == concept for c in run.captions if named.search(c))


def _strict_synonyms(found) -> List[str]:
    """The synonyms that are the concept to the model in every caption, not only on the whole: those are read as
    the destination (the unseen mini model's square, a synonym by its mean ratio 0.18 for one seed, is a shape of
    its own there, and reading it as the destination turned its squares into triangles)."""
    return [w for w in found.synonyms if found.most.get(w, 0.0) < SYNONYM_RATIO]


def sequences(g: torch.Generator, context: List[str], inserted: List[str], n: int, longest: int) -> List[List[str]]:
    """n random word sequences of 0..longest words; with `inserted`, one of them at a random place in each."""
    pick = lambda k, pool: [pool[i] for i in torch.randint(0, len(pool), (k,), generator=g).tolist()]
    out = []
    for _ in range(n):
        seq = pick(int(torch.randint(0, longest + 1, (1,), generator=g)), context)
        if inserted:
            seq.insert(int(torch.randint(0, len(seq) + 1, (1,), generator=g)), pick(1, inserted)[0])
        out.append(seq)
    return out


def distance(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the mean squared difference of two conditionings, summed over their tensors (context, pooled)."""
    return sum((a[k].float() - b[k].float()).pow(2).flatten(1).mean(1) for k in a if a[k].is_floating_point())


class TextVDU:
    """`vdu_loss` on the text encoder's deltas (the objectives' contract: draw, loss, should_stop), with the
    conditioning E in place of the denoiser's prediction:

        L(φ) = γ · S(φ)  +  (1 − γ) · N · w_d · E_s ‖E_φ(s) − E*(s_d)‖²

    s a random word sequence holding the concept, s_d the same with the destination word in its place, and
    S(φ) = Σ φ² / (2σ²) + replay · N · E_s' ‖E_φ(s') − E*(s')‖² over sequences s' holding a word near it
    instead: the paper's Gaussian prior (isotropic, centred on the frozen encoder) and its quadratic form on
    what must not change. The plasticity inducer has no term here (λ = 0): an encoding has no likelihood to
    lower, and pushing it away from where it was, in no particular direction, moved the words beside it (the
    unseen mini model's squares: retain 40.5 %; docs/quality/tuning.md, "Stop 41"). The destination moves it."""

    reported = ("stability", "destination", "drift")

    def __init__(self, run):
        self.run, self.plan = run, run.text_plan
        self.steps = run.cfg.text_steps
        self.start: Optional[float] = None  # the destination term at the first step
        self.prior = isotropic_prior(run.cfg.prior_sigma)
        # Plain words only: hosts read brackets, colons and weights in a prompt as syntax (ComfyUI, the WebUI)
        self.context = [w for w in run.backend.vocabulary()[0] if w.isalpha() and w not in self.plan.words]
        self.longest = max(run.backend.text_length() - 3, 1)

    def draw(self, g: torch.Generator) -> Dict[str, List[List[str]]]:
        """Sequences with the concept, and as many with one of the words nearest to it in its place: a change to
        the concept's token spills first onto the tokens the encoder places beside it (the unseen mini model's
        square), so those are held in every step, not only when a random sequence happens to hold one."""
        return {"named": sequences(g, self.context, self.plan.words, BATCH, self.longest),
                "plain": sequences(g, self.context, self.plan.near, BATCH, self.longest)}

    def _swap(self, seq: List[str]) -> str:
        return " ".join(self.plan.destination if w in self.plan.words else w for w in seq)

    def loss(self, batch, part: slice):
        run, cfg, encode = self.run, self.run.cfg, self.run.backend.encode_text
        scale = BATCH / cfg.batch_size  # `part` slices the step's --batch-size rows; this batch has BATCH of each
        rows = slice(round(part.start * scale), round(part.stop * scale))
        named, plain = batch["named"][rows], [" ".join(s) for s in batch["plain"][rows]]
        with torch.no_grad(), run.network.disabled():
            goal, held = encode([self._swap(s) for s in named]), encode(plain)
        now = encode([" ".join(s) for s in named] + plain)
        k = len(named)
        destination = distance({key: v[:k] for key, v in now.items()}, goal).mean()
        drift = distance({key: v[k:] for key, v in now.items()}, held).mean()
        n = run.n_forget
        stability = run.prior_energy(self.prior) + cfg.replay * n * drift
        if self.start is None:
            self.start = destination.item()
        zero = torch.zeros(k, device=destination.device)
        loss = vdu_loss(stability, zero, zero, cfg.destination * destination, cfg.gamma, n, 0.0)
        return loss, {"stability": stability.detach(), "destination": destination.detach(), "drift": drift.detach()}

    def should_stop(self, ema) -> bool:
        return self.start is not None and ema.get("destination", float("inf")) <= STOP_SHARE * self.start


@torch.no_grad()
def gap_left(run) -> float:
    """On the run's captions naming the concept: ‖E_φ(c) − E*(c_d)‖² / ‖E*(c) − E*(c_d)‖², the share of
    the way from the caption to its destination's version that the remap did not go (0: it reads as d)."""
    p = run.text_plan
    named = word_pattern(p.words)
    captions = sorted({c for c in run.captions if named.search(c)})
    if not captions:
        return float("nan")
    with run.network.attached():
        after = run.backend.encode_text(captions)
        with run.network.disabled():
            before, goal = run.backend.encode_text(captions), run.backend.encode_text([named.sub(p.destination, c)
                                                                                       for c in captions])
    return float(distance(after, goal).sum() / distance(before, goal).sum().clamp_min(1e-12))
