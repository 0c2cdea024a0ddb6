"""The training objectives: one class each, over one contract.

An objective is built once per run from the run's inputs (`train.Run`); it prepares what it
needs before training (pools of frozen predictions, the prior, the bound), draws each step's
batch, and gives the loss of one forward/backward pass over a slice of that batch together with
the statistics the progress bar shows. `train._optimise` knows nothing else about it.

Notation: x_t noisy latents at timesteps t, c a caption naming the concept, c⁻ the same caption
with the concept taken out ("a red circle" → "a circle"), ε_θ the adapted network's output (ε, or
v for v-prediction models), target the true ε (or v), and ε* the loaded model with the LoRA off.
"""

from __future__ import annotations

import time
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .backend import cond_cat, cond_index
from .pools import PredictionPool

Stats = Dict[str, torch.Tensor]


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² per sample, averaged over latent elements (the constant factor is absorbed into
    σ*, so the prior scale does not depend on the resolution)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def vdu_loss(stability: torch.Tensor, err: torch.Tensor, bound: torch.Tensor, destination: torch.Tensor,
             gamma: float, n_forget: int, plasticity: float) -> torch.Tensor:
    """Variational Diffusion Unlearning (Panda et al., TMLR 2026, eq. of the objective):

        L(θ) = γ · Σ_i (θ_i − μ*_i)² / (2 σ*_i²)                 (stability regularizer)
               − (1 − γ) · Σ_{x ∈ D_f} Σ_t C_t ‖ε − ε_θ(x_t, t, c)‖²   (plasticity inducer)

    as computed here, with D_f's sum estimated from the batch (N = |D_f| × the batch mean):

        L(θ) = γ · S(θ)  +  (1 − γ) · N · ( w_d · E_d ‖ε_θ(x^d_t, c) − ε_dest‖²
                                             −  λ · E_f min(‖ε − ε_θ(x_t, c)‖², b) )

    - S(θ) (`stability`): the paper's Gaussian prior energy, plus that Gaussian's quadratic form in
      function space, replay · N · E‖ε_θ − ε*‖² on images the model generates itself for the
      preservation prompts (`VDU`), which the diagonal prior alone misses, for their own prompt c' and
      for the unconditional prompt ∅, which guidance evaluates on every sample; and the same on the
      forget images under their captions with a neighbour in the concept's place (c_w: "a red
      circle" → "an orange circle"), so the concept does not move into its neighbours' prompts.
    - the plasticity inducer (`err`, weight λ = `plasticity`) lowers the likelihood of the forget
      images x under c; each sample's error is capped at b (`bound`, a multiple of the frozen model's
      own error on that sample), past which it gives no gradient: the paper's term is unbounded below.
    - the destination (`destination`: w_d × the mean of ‖ε_θ − ε_dest‖² over the destination's rows) says
      where the lowered likelihood goes. On the frozen model's own images x^d for destination prompts
      c_d (destination.py: the caption without the concept, or with a neighbour in its place), the
      caption c naming the concept is pulled to ε_dest = ε*(x^d_t, c_d) − η (ε*(x^d_t, c) − ε*(x^d_t, c_d)),
      the destination prompt's prediction guided away from the concept. The inducer alone drives the
      forget prompts to noise; with a destination they draw the rest of what they ask for.
    The same function trains the text encoder's deltas where the run puts the destination there
    (text_remap.TextVDU): the encoder's output in place of ε, random word sequences in place of images, λ = 0.
    """
    forget = destination - plasticity * torch.minimum(err, bound)
    return gamma * stability + (1 - gamma) * n_forget * forget.mean()


def gradient_ascent_loss(err: torch.Tensor) -> torch.Tensor:
    """The plasticity inducer alone, unbounded: raise the denoising error of the forget set."""
    return -err.mean()


def esd_loss(pred: torch.Tensor, frozen_cond: torch.Tensor, frozen_uncond: torch.Tensor,
             eta: float) -> torch.Tensor:
    """ESD (Gandikota et al. 2023): pull ε_θ(x_t, c) to the negatively guided frozen output
    ε*(x_t, ∅) − η [ε*(x_t, c) − ε*(x_t, ∅)]."""
    return denoising_error(pred, guided_away(frozen_uncond, frozen_cond, eta)).mean()


def score_align_loss(pred: torch.Tensor, frozen_anchor: torch.Tensor) -> torch.Tensor:
    """SFD-style score alignment: the concept's conditional prediction ε_θ(x_t, c) pulled to
    the frozen model's prediction for the safe anchor prompt, ε*(x_t, c_anchor)."""
    return denoising_error(pred, frozen_anchor).mean()


def guided_away(toward: torch.Tensor, concept: torch.Tensor, eta: float) -> torch.Tensor:
    """toward − η (concept − toward): a negative prompt of strength η (ESD's target with
    toward = ε*(x_t, ∅); VDU's destination with toward = ε*(x_t, c⁻))."""
    return toward - eta * (concept - toward)


class HeldNeighbours(NamedTuple):
    """The forget pool's rows under their captions with a neighbour in the concept's place (VDU._held_neighbours)."""
    cond: Dict[str, torch.Tensor]  # the distinct neighbour captions, encoded
    index: torch.Tensor  # per pool row: its caption's index in cond
    ref: torch.Tensor  # per pool row: the frozen model's prediction under it
    named: torch.Tensor  # per pool row: whether its caption names the concept (the others hold nothing)


class HeldUnconditional(NamedTuple):
    """The empty prompt on every replay row (VDU._replay_empty)."""
    cond: Dict[str, torch.Tensor]  # the empty prompt, encoded
    ref: torch.Tensor  # per replay row: the frozen model's prediction ε*(x'_t, ∅)


class Objective:
    """The contract. `reported`: the statistics `loss` returns, shown in this order."""

    reported: Tuple[str, ...] = ()

    def __init__(self, run):
        self.run = run
        self.pool = PredictionPool.of_forget_set(run)

    def draw(self, g: torch.Generator) -> Dict[str, torch.Tensor]:
        """The step's whole batch (every process draws the same one; passes take slices)."""
        return {"rows": self.pool.draw(self.run.cfg.batch_size, g)}

    def loss(self, batch, part: slice) -> Tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def should_stop(self, ema: Dict[str, float]) -> bool:
        return False

    def _forward(self, rows, extras: Optional[Dict[str, tuple]] = None):
        """ε_θ on pool rows, and on each named extra (x_t, t, cond) riding in the same forward pass; an
        extra with no rows is left out of the returned dict."""
        run, p = self.run, self.pool
        extras = {k: e for k, e in (extras or {}).items() if len(e[0])}
        parts = [(p.x_t[rows], p.t[rows], run.forget_cond(p.caption[rows]))] + list(extras.values())
        pred = run.denoise(torch.cat([x for x, _, _ in parts]), torch.cat([t for _, t, _ in parts]),
                           cond_cat([c for _, _, c in parts]))
        out = pred.split([len(x) for x, _, _ in parts])
        return out[0], dict(zip(extras, out[1:]))


class GradientAscent(Objective):
    reported = ("forget_error",)

    def loss(self, batch, part):
        rows = batch["rows"][part]
        pred, _ = self._forward(rows)
        err = denoising_error(pred, self.pool.target[rows])
        return gradient_ascent_loss(err), {"forget_error": err.mean().detach()}


class ESD(Objective):
    """Erased Stable Diffusion (Gandikota et al., ICCV 2023): ε_θ(x_t, c) pulled to
    ε*(x_t, ∅) − η [ε*(x_t, c) − ε*(x_t, ∅)], the frozen model negatively guided by the concept."""

    def __init__(self, run):
        super().__init__(run)
        self.uncond, self.named = self.pool.frozen(run, lambda i: ""), self.pool.frozen_named(run)

    def loss(self, batch, part):
        rows = batch["rows"][part]
        pred, _ = self._forward(rows)
        return esd_loss(pred, self.named[rows], self.uncond[rows], self.run.cfg.esd_eta), {}


class ScoreAlign(Objective):
    """SFD-style score alignment (Chen et al., ICLR 2025): the concept's prediction ε_θ(x_t, c)
    pulled to the frozen model's prediction for a safe anchor prompt, ε*(x_t, c_anchor). The anchor is
    the user's `--anchor`; without one, each caption's own c⁻ (the caption without the concept, so "a red
    circle on white" is aligned to "a circle on white" rather than to the empty prompt, which would erase
    the whole caption; the bare concept word's c⁻ is the empty prompt)."""

    def __init__(self, run):
        super().__init__(run)
        self.goal = self.pool.frozen(run, run.destination_prompt)

    def loss(self, batch, part):
        rows = batch["rows"][part]
        pred, _ = self._forward(rows)
        return score_align_loss(pred, self.goal[rows]), {}


class VDU(Objective):
    """`vdu_loss` over: the forget pool, the destination's images (destination.py), the replay pool
    of the model's own images for the preservation prompts, the prior, and each forget row's bound."""

    reported = ("stability", "destination", "forget_error", "bounded")

    def __init__(self, run):
        super().__init__(run)
        cfg = run.cfg
        self.prior = run.prior()
        self.bound = self._plasticity_bound() if cfg.plasticity > 0 else None
        self.replay = PredictionPool.of_own_images(run) if cfg.replay > 0 else None
        self.replay_empty = self._replay_empty() if self.replay is not None and cfg.hold_unconditional else None
        self.dest = run.destination_pool()
        self.goal = self._destination_goal()
        self.n_replay = cfg.replay_batch or cfg.batch_size
        self.held = self._held_neighbours() if cfg.hold_neighbours and cfg.replay > 0 else None

    def _plasticity_bound(self) -> torch.Tensor:
        """b per forget row: `bound` × the frozen model's own error on that row (the same image, noise, timestep
        and caption). Each sample's error may rise to a multiple of what it was, wherever that was: a cap shared
        by a timestep's samples (their mean error) let the samples the model found easy, such as small shapes on
        plain backgrounds, rise many times over, and the model drew frames and washed-out colour there
        (docs/quality/tuning.md, 2026-12-06)."""
        t0 = time.perf_counter()
        frozen_error = denoising_error(self.pool.frozen_named(self.run), self.pool.target)
        self.run.timings["bound"] = time.perf_counter() - t0
        return self.run.cfg.bound * frozen_error

    def _destination_goal(self):
        """ε_dest per destination row: the destination prompt's prediction, guided away from the concept where
        the destination says so (destination.Destination.guidance)."""
        if self.dest is None:
            return None
        eta = self.run.cfg.anchor_guidance if self.run.destination.guidance else 0.0
        return guided_away(self.dest.ref, self.dest.target, eta)

    def _replay_empty(self):
        """The empty prompt encoded, and the frozen model's prediction for it on every replay row.
        Classifier-free guidance evaluates ε(∅) on every prompt's sample, ε(∅) + w (ε(c) − ε(∅)), so
        a drift there moves them all; held only on the unconditional prompt's own images, it let a
        circle run turn square prompts round (docs/quality/tuning.md, 2026-12-06 (fifth))."""
        cond, _, ref = self.replay.frozen_per_row(self.run, [""] * len(self.replay))
        return HeldUnconditional(cond, ref)

    def _held_neighbours(self):
        """Per forget row, its caption with one of the vicinity's neighbours in the concept's place (row r takes
        neighbour r mod K, so each neighbour meets every context) and the frozen model's prediction for it."""
        run, pool = self.run, self.pool
        words = run.vicinity.neighbours
        if not words or run.concept_words is None:
            return None
        captions = [run.all_captions[c] for c in pool.caption.tolist()]
        prompts = [run.concept_words.sub(words[r % len(words)], c) for r, c in enumerate(captions)]
        named = torch.tensor([p != c for p, c in zip(prompts, captions)], device=pool.t.device)
        return HeldNeighbours(*pool.frozen_per_row(run, prompts), named)

    def draw(self, g):
        batch = super().draw(g)
        for name, pool in (("replay", self.replay), ("dest", self.dest)):
            if pool is not None:
                batch[name] = pool.draw(self.n_replay, g)
        return batch

    def _share_of(self, batch, name, part: slice):
        """The rows of pool `name` that go with a slice of the forget batch: the same share of them."""
        if getattr(self, name) is None or name not in batch:
            return None
        scale = self.n_replay / self.run.cfg.batch_size
        return batch[name][round(part.start * scale):round(part.stop * scale)]

    def _extra(self, pool, rows, cond):
        return pool.x_t[rows], pool.t[rows], cond

    def loss(self, batch, part):
        run, cfg, pool, n = self.run, self.run.cfg, self.pool, self.run.n_forget
        rows = batch["rows"][part]
        replay, dest = self._share_of(batch, "replay", part), self._share_of(batch, "dest", part)
        extras = {}
        if replay is not None:
            replay_cond = cond_index(self.replay.cond, self.replay.caption[replay])
            extras["replay"] = self._extra(self.replay, replay, replay_cond)
            if self.replay_empty is not None:
                empty = cond_index(self.replay_empty.cond, torch.zeros_like(replay))
                extras["replay_empty"] = self._extra(self.replay, replay, empty)
        if dest is not None:
            extras["dest"] = self._extra(self.dest, dest, run.forget_cond(self.dest.caption[dest]))
        if self.held is not None:
            extras["held"] = self._extra(pool, rows, cond_index(self.held.cond, self.held.index[rows]))
        pred, preds = self._forward(rows, extras)
        pred_r, pred_d, pred_h = preds.get("replay"), preds.get("dest"), preds.get("held")
        err = denoising_error(pred, pool.target[rows])
        bound = self.bound[rows] if self.bound is not None else torch.zeros_like(err)
        # Replay and destination rows: summed over this pass's rows and divided by its share of the batch,
        # so that passes add up to the step's mean.
        share = cfg.batch_size / (len(rows) * self.n_replay)
        zero = torch.zeros((), device=pred.device)
        destination = denoising_error(pred_d, self.goal[dest]).sum() * share if pred_d is not None else zero
        stability = run.prior_energy(self.prior)
        if pred_r is not None:
            # replay · N · E‖ε_θ(x'_t, c') − ε*(x'_t, c')‖²
            drift = denoising_error(pred_r, self.replay.ref[replay])
            if self.replay_empty is not None:
                # + the same for the unconditional prediction ε_θ(x'_t, ∅), on the same rows
                drift = drift + denoising_error(preds["replay_empty"], self.replay_empty.ref[replay])
            stability = stability + cfg.replay * n * drift.sum() * share
        if pred_h is not None:
            # replay · N · E‖ε_θ(x_t, c_w) − ε*(x_t, c_w)‖² on the forget rows, under a neighbour's caption
            held = denoising_error(pred_h, self.held.ref[rows]) * self.held.named[rows]
            stability = stability + cfg.replay * n * held.mean()
        loss = vdu_loss(stability, err, bound, cfg.destination * destination, cfg.gamma, n, cfg.plasticity)
        if cfg.variational:
            loss = loss - cfg.gamma * run.network.entropy().to(loss.device)  # KL = E_q[−log p] − H[q]
        bounded = (err >= bound).float().mean() if self.bound is not None else torch.zeros(())
        return loss, {"stability": stability.detach(), "destination": destination.detach(),
                      "forget_error": err.mean().detach(), "bounded": bounded.to(err.device)}

    def should_stop(self, ema):
        cfg = self.run.cfg
        bounded = ema.get("bounded", 0.0)
        return self.bound is not None and cfg.stop_when_bounded > 0 and bounded >= cfg.stop_when_bounded


REGISTRY = {"vdu": VDU, "esd": ESD, "score_align": ScoreAlign, "gradient_ascent": GradientAscent}
