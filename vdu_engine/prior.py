"""The stability regularizer: a diagonal Gaussian prior N(μ*, σ*²) over the adapted weights.

With θ = θ* + ΔW its energy is Σ_i (θ*_i + ΔW_i − μ*_i)² / (2 σ*_i²). Three ways to get μ*, σ*²:
- isotropic: μ* = θ* (the loaded weights), one σ for every weight;
- fisher: μ* = θ*, 1/σ*_i² ∝ the diagonal Fisher information of the model on images it generates
  itself (a Laplace approximation, as EWC): weights that the model's other outputs rely on are
  held tight, the rest may move. Computed once per model and layer set, cached on disk;
- ensemble: μ*, σ*² = per-weight mean and variance over the loaded model and other checkpoints
  of the same architecture (the paper's setting).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from .backend import AdaptTarget, Backend, Cond
from .objectives import denoising_error
from .saving import atomic_save_file

# Fisher precisions are normalised to mean 1, plus this floor so no weight is entirely free.
FISHER_FLOOR = 0.01


class PriorEnergy:
    """Σ_i (ΔW_i + offset_i)² · precision_i / 2 over the adapted layers."""

    def __init__(self, precision: Dict[str, torch.Tensor] | float,
                 offset: Optional[Dict[str, torch.Tensor]] = None):
        self.precision, self.offset = precision, offset

    def to(self, device) -> "PriorEnergy":
        mv = lambda d: {k: v.to(device) for k, v in d.items()} if isinstance(d, dict) else d
        return PriorEnergy(mv(self.precision), mv(self.offset))

    def __call__(self, layers, factors: Dict[str, tuple]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(factors.values()))[0].device)
        for key, (down, up) in factors.items():
            layer = layers[key]
            if isinstance(self.precision, float) and self.offset is None:
                # ‖s·U D‖² = s² tr((UᵀU)(D Dᵀ)): rank × rank work instead of out × in.
                u, d = up.flatten(1), down.flatten(1)
                sq = layer.scale ** 2 * ((u.T @ u) * (d @ d.T)).sum()
                total = total + 0.5 * self.precision * sq
                continue
            dw = layer.delta_weight(down, up)
            if self.offset is not None:
                dw = dw + self.offset[key]
            prec = self.precision[key] if isinstance(self.precision, dict) else self.precision
            total = total + 0.5 * (dw.pow(2) * prec).sum()
        return total


def isotropic_prior(sigma: float) -> PriorEnergy:
    return PriorEnergy(1.0 / sigma ** 2)


def ensemble_prior(targets: List[AdaptTarget], others: List[Dict[str, torch.Tensor]],
                   sigma: float) -> PriorEnergy:
    """Mean and variance over the loaded weights and `others` (key → weight). `sigma` floors
    the standard deviation so weights on which all checkpoints agree are not frozen solid."""
    precision, offset = {}, {}
    for t in targets:
        stack = torch.stack([t.module.weight.detach().float().cpu()] +
                            [o[t.key].float().cpu() for o in others])
        mean, var = stack.mean(0), stack.var(0, unbiased=True)
        precision[t.key] = 1.0 / (var + sigma ** 2)
        offset[t.key] = stack[0] - mean  # θ* − μ*
    return PriorEnergy(precision, offset)


def fisher_cache_path(cache_dir: str, backend: Backend, targets: List[AdaptTarget],
                      spec: dict) -> Path:
    h = hashlib.sha256(json.dumps({"model": backend.model_hash, "keys": sorted(t.key for t in targets),
                                   **spec}, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"fisher-{h}.safetensors"


def diagonal_fisher(backend: Backend, targets: List[AdaptTarget], latents: torch.Tensor,
                    cond: Cond, seed: int, prompts: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """E[(∂ log p / ∂W)²] with log p ∝ −‖target − pred‖², one sample (and timestep) at a time
    so the squares are per-sample, as the Fisher needs. Gradients go to the base weights
    only for this estimate; their requires_grad flags are restored by the caller. With text-encoder
    targets, `prompts` (one per latent) are encoded inside the graph: the precomputed `cond`
    carries no gradient to the text encoder's weights."""
    g = torch.Generator().manual_seed(seed)
    weights = [t.module.weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    T = backend.schedule.num_train_timesteps
    for i in range(latents.shape[0]):
        x0 = latents[i:i + 1]
        t = torch.randint(0, T, (1,), generator=g).to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        x_t = backend.schedule.add_noise(x0, eps, t)
        c = backend.encode_text(prompts[i:i + 1]) if prompts is not None else {k: v[i:i + 1] for k, v in cond.items()}
        pred = backend.denoise(x_t, t, c)
        loss = denoising_error(pred, backend.schedule.target(x0, eps, t)).sum()
        for f, gr in zip(fisher, torch.autograd.grad(loss, weights)):
            f += gr.float().pow(2)
    for w in weights:
        w.requires_grad_(False)
    return {t.key: (f / latents.shape[0]).cpu() for t, f in zip(targets, fisher)}


def fisher_prior(fisher: Dict[str, torch.Tensor], sigma: float) -> PriorEnergy:
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
    return PriorEnergy({k: (f / mean + FISHER_FLOOR) / sigma ** 2 for k, f in fisher.items()})


def cached_fisher(path: Path, compute) -> Dict[str, torch.Tensor]:
    """Load the Fisher estimate from `path`, or compute and store it (atomically)."""
    if path.exists():
        return load_file(str(path))
    fisher = compute()
    os.makedirs(path.parent, exist_ok=True)
    atomic_save_file({k: v.contiguous() for k, v in fisher.items()}, path, {"format": "pt"},
                     overwrite=True)
    return fisher
