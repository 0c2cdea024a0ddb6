"""The training objectives, each a few lines over the same inputs.

Notation: x_t noisy forget latents at timesteps t, c the concept's conditioning, pred the
adapted network's output ε_θ(x_t, t, c) (or v for v-prediction models), target the true ε (or v),
and frozen(·) the loaded model with the LoRA switched off, evaluated without gradients.
"""

from __future__ import annotations

import torch


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ(x_t, t, c)‖² per sample, averaged over latent elements (the constant factor
    is absorbed into σ*, so the prior scale does not depend on the resolution)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def vdu_loss(stability: torch.Tensor, err: torch.Tensor, bound: torch.Tensor,
             gamma: float, n_forget: int) -> torch.Tensor:
    """Variational Diffusion Unlearning (FIELD_NOTES §1):

        L(θ) = γ · Σ_i (θ_i − μ*_i)² / (2 σ*_i²)  −  (1 − γ) · Σ_{x ∈ D_f} Σ_t C_t ‖ε − ε_θ(x_t, t, c)‖²

    `stability` is the first sum (prior.PriorEnergy), plus by default the same Gaussian's
    quadratic form measured in function space, replay · N · E‖ε_θ − ε_θ*‖² on images the model
    generates itself (train.Terms, replayed from a pool made once), which the diagonal misses. The second sum is
    estimated from the batch: n_forget × the batch mean, t drawn uniformly from the trained range (C_t = 1 there, 0
    outside). Each sample's error is capped at `bound` (a multiple of the frozen model's own
    error at that timestep): the term is unbounded below otherwise, and once a sample is
    "forgotten enough" its gradient stops instead of pushing the model into noise.
    """
    plasticity = n_forget * torch.minimum(err, bound).mean()
    return gamma * stability - (1 - gamma) * plasticity


def gradient_ascent_loss(err: torch.Tensor) -> torch.Tensor:
    """The plasticity inducer alone, unbounded: raise the denoising error of the forget set."""
    return -err.mean()


def esd_loss(pred: torch.Tensor, frozen_cond: torch.Tensor, frozen_uncond: torch.Tensor,
             eta: float) -> torch.Tensor:
    """ESD (Gandikota et al. 2023): pull ε_θ(x_t, c) to the negatively guided frozen output
    ε*(x_t, ∅) − η [ε*(x_t, c) − ε*(x_t, ∅)]."""
    target = frozen_uncond - eta * (frozen_cond - frozen_uncond)
    return denoising_error(pred, target).mean()


def score_align_loss(pred: torch.Tensor, frozen_anchor: torch.Tensor) -> torch.Tensor:
    """SFD-style score alignment: the concept's conditional prediction ε_θ(x_t, c) pulled to
    the frozen model's prediction for the safe anchor prompt, ε*(x_t, c_anchor)."""
    return denoising_error(pred, frozen_anchor).mean()
