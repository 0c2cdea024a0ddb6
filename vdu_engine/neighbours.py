"""What a forget run would drag along, found without retain data.

Forgetting a concept moves what the text encoder places near it. The words nearest to the
concept in the text encoder's token-embedding table are the candidates; the frozen model itself
tells them apart by what it predicts when the word takes the concept's place in the forget
captions ("a red circle" → "a crimson circle", "an orange circle"):

- a **synonym** changes the prediction less than taking the concept out does: to the model it
  *is* the concept, so it is forgotten with it (its captions join the forget captions);
- a **neighbour** changes it at least as much: a concept of its own, whose predictions are held
  (its captions join the preservation prompts).

The test is a ratio of two distances measured on the same noisy forget latents, so it carries no
scale of its own: it reads the same on a 64-wide toy encoder and on CLIP-L.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .backend import Backend, cond_index
from .objectives import denoising_error

log = logging.getLogger("vdu_engine")

# A synonym moves the prediction less than a fifth as far as removing the concept does. On the mini
# model the two kinds lie far apart (synonyms 0.001-0.004, every other word 0.38 or more), so the
# value is a margin, not a fit.
SYNONYM_RATIO = 0.2
_WORD = re.compile(r"^[a-z][a-z\-]+$")


def word_pattern(words: List[str]) -> re.Pattern:
    """Whole-word, case-insensitive match of any of `words`."""
    return re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in words) + r")\b", re.IGNORECASE)


def without(caption: str, pattern: re.Pattern) -> str:
    """The caption with the matched words taken out ("a small red circle" → "a small circle")."""
    return " ".join(pattern.sub(" ", caption).split())


def nearest_words(backend: Backend, concept: str, k: int, exclude=()) -> List[str]:
    """The k whole words whose token embeddings lie nearest (cosine) to the concept's (the mean of
    its tokens' embeddings), leaving out `exclude`; [] when the backend exposes no vocabulary."""
    vocab = backend.vocabulary()
    if vocab is None or not concept.strip():
        return []
    words, table = vocab
    index = {w: i for i, w in enumerate(words)}
    mine = [index[w] for w in concept.lower().split() if w in index]
    if not mine:
        return []
    table = torch.nn.functional.normalize(table.float(), dim=1)
    sims = table @ table[mine].mean(0)
    own = set(concept.lower().split()) | {w.lower() for w in exclude}
    ranked = [words[i] for i in sims.argsort(descending=True).tolist()]
    return [w for w in ranked if w not in own and _WORD.match(w) and len(w) > 2][:k]


@dataclass
class Vicinity:
    """The concept's candidates, each with its distance ratio, split into synonyms and neighbours."""

    synonyms: List[str] = field(default_factory=list)
    neighbours: List[str] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)
    least: Dict[str, float] = field(default_factory=dict)  # the smallest of the per-caption ratios
    most: Dict[str, float] = field(default_factory=dict)  # the largest of them


@torch.no_grad()
def _predict(backend, x_t, t, cond, batch: int = 8) -> torch.Tensor:
    return torch.cat([backend.denoise(x_t[s:s + batch], t[s:s + batch], cond_index(cond, slice(s, s + batch))).float()
                      for s in range(0, len(x_t), batch)])


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return _per_row(a, b).mean().item()


def _per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def caption_words(captions: List[str], concept: str) -> set:
    """The words that appear beside the concept in its own captions ("small", "circle", "grey" in
    "a small red circle on a grey background"): they describe something else about the same image,
    so they are not alternatives to the concept, and are no candidates."""
    pattern = word_pattern([concept])
    return {w.lower() for c in captions if pattern.search(c) for w in re.findall(r"[A-Za-z][A-Za-z\-]*", c)}


def classify(backend: Backend, latents: torch.Tensor, captions: List[str], concept: str,
             candidates: List[str], seed: int, n: int = 16) -> Vicinity:
    """Split `candidates` by the frozen model's predictions on n noisy forget latents: for each
    candidate w, ratio(w) = E‖ε*(x_t, c_w) − ε*(x_t, c)‖² / E‖ε*(x_t, c⁻) − ε*(x_t, c)‖², with
    c the caption, c_w the caption with w in the concept's place and c⁻ the caption without it."""
    pattern = word_pattern([concept])
    pairs = [(i, c) for i, c in enumerate(captions) if pattern.search(c)]
    if not candidates or not pairs:
        return Vicinity()
    g = torch.Generator().manual_seed(seed + 5)
    pick = [pairs[j] for j in torch.randint(0, len(pairs), (n,), generator=g).tolist()]
    x0 = latents[[i for i, _ in pick]].to(backend.device, backend.dtype)
    T = backend.schedule.num_train_timesteps
    t = torch.randint(T // 10, T, (n,), generator=g).to(backend.device)
    x_t = backend.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t)
    named = [c for _, c in pick]
    named_pred = _predict(backend, x_t, t, backend.encode_text(named))
    removed_cond = backend.encode_text([without(c, pattern) for c in named])
    removed_rows = _per_row(named_pred, _predict(backend, x_t, t, removed_cond))
    removed = removed_rows.mean().item()
    out = Vicinity()
    for w in candidates:
        swapped_cond = backend.encode_text([pattern.sub(w, c) for c in named])
        if not all(v.isfinite().all() for v in swapped_cond.values() if v.is_floating_point()):
            # The text encoder overflows on this word (an fp16 encoder can): it can be neither held nor forgotten,
            # and a host that normalises a prompt batch as a whole would spread its nan to every prompt beside it.
            log.warning("left out of the nearby words: %r, which the text encoder encodes as nan/inf", w)
            continue
        swapped = _per_row(named_pred, _predict(backend, x_t, t, swapped_cond))
        out.ratios[w] = swapped.mean().item() / max(removed, 1e-12)
        per_caption = swapped / removed_rows.clamp_min(1e-12)
        out.least[w], out.most[w] = per_caption.min().item(), per_caption.max().item()
        (out.synonyms if out.ratios[w] < SYNONYM_RATIO else out.neighbours).append(w)
    return out


# c⁻ is replaced as the destination when the concept's caption explains more than half of the destination's
# images better than the same caption with its nearest neighbour does: a majority vote, not a fit.
SHOWS_CONCEPT_SHARE = 0.5


@torch.no_grad()
def concept_share(backend: Backend, latents: torch.Tensor, captions: List[str], concept: str,
                  alternative: str, seed: int, m: int = 8) -> float:
    """The share of images (scaled latents, one per caption) in which the frozen model, used as a
    diffusion classifier (Li et al., ICCV 2023), sees the concept rather than an alternative word:
    the caption c naming it explains the image better, by the denoising error over m shared noisy
    versions, than c with the alternative in its place. Images of "a circle" made by a model that
    draws circles red read as red against "an orange circle"; images of "a blue" drawn as blue
    squares do not read as circles against "a blue square"."""
    pattern = word_pattern([concept])
    g = torch.Generator().manual_seed(seed + 7)
    T = backend.schedule.num_train_timesteps
    x0 = latents.repeat_interleave(m, 0).to(backend.device, backend.dtype)
    t = torch.randint(T // 10, T, (len(x0),), generator=g).to(backend.device)
    eps = torch.randn(x0.shape, generator=g).to(x0)
    x_t, target = backend.schedule.add_noise(x0, eps, t), backend.schedule.target(x0, eps, t)

    def error(prompts: List[str]) -> torch.Tensor:
        pred = _predict(backend, x_t, t, backend.encode_text([p for p in prompts for _ in range(m)]))
        return denoising_error(pred, target).view(len(prompts), m).mean(1)

    swapped = [pattern.sub(alternative, c) for c in captions]
    return (error(captions) < error(swapped)).float().mean().item()
