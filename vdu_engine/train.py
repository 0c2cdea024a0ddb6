"""`unlearn`: one run from a backend, a config and a forget set to a LoRA.

Order of work: validate → forget latents and text embeddings (once) → layers → prior → the
frozen model's error profile (for the plasticity bound) → optimisation → result. Nothing is
written to disk here except the Fisher cache; `UnlearnResult.save` writes the LoRA.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import __version__
from .backend import Backend, cond_index
from .config import UnlearnConfig
from .data import ForgetSet
from .errors import VDUError
from .layers import select_targets
from .lora import LoRANetwork
from .objectives import (denoising_error, esd_loss, gradient_ascent_loss, score_align_loss,
                         vdu_loss)
from .prior import (PriorEnergy, cached_fisher, diagonal_fisher, ensemble_prior,
                    fisher_cache_path, fisher_prior, isotropic_prior)
from .sampling import ddim_latents
from .saving import atomic_save_file

Progress = Callable[[int, int, Dict[str, float]], None]
N_BOUND_BUCKETS = 10


@dataclass
class UnlearnResult:
    lora: Dict[str, torch.Tensor]  # kohya state dict
    metadata: Dict[str, str]
    history: List[Dict[str, float]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    network: Optional[LoRANetwork] = None  # the trained deltas, e.g. to sample with them

    def save(self, path, overwrite: bool = False):
        return atomic_save_file(self.lora, path, self.metadata, overwrite=overwrite)


@contextmanager
def frozen(backend: Backend):
    """No gradients for the model's own weights during the run; flags restored after."""
    params = backend.parameters()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _forget_latents(backend, cfg, forget, resolution):
    """Latents [N, ...] and captions of the forget set, encoded once."""
    if forget is None:
        if not cfg.concept.strip():
            raise VDUError("nothing to forget: give a folder of images (--images) or a concept prompt (--concept)")
        prompts = [cfg.concept] * cfg.num_images
        lat = ddim_latents(backend, prompts, cfg.seed, cfg.sample_steps, cfg.guidance, resolution)
        return lat, prompts
    if len(forget) == 0:
        raise VDUError("the forget set is empty; add images of the concept")
    captions = forget.captions_for(cfg.concept)
    pixels = forget.pixels(resolution)
    with torch.no_grad():
        lat = torch.cat([backend.encode_images(pixels[i:i + 8].to(backend.device))
                         for i in range(0, len(pixels), 8)]).float()
    return lat, captions


def _encode_unique(backend, prompts):
    """Each distinct prompt through the text encoder once; rows gathered per prompt."""
    uniq = sorted(set(prompts))
    with torch.no_grad():
        cond = backend.encode_text(uniq)
    index = torch.tensor([uniq.index(p) for p in prompts])
    return cond_index(cond, index.to(next(iter(cond.values())).device))


def _build_prior(backend, cfg, targets, resolution) -> PriorEnergy:
    if cfg.prior == "isotropic":
        return isotropic_prior(cfg.prior_sigma)
    if cfg.prior == "ensemble":
        others = [backend.target_weights_from(path, [t.key for t in targets]) for path in cfg.ensemble]
        return ensemble_prior(targets, others, cfg.prior_sigma)
    spec = dict(n=cfg.fisher_samples, prompts=cfg.fisher_prompts, res=resolution, seed=cfg.seed,
                steps=cfg.sample_steps, guidance=cfg.guidance)
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vdu-unlearn")

    def compute():
        prompts = [cfg.fisher_prompts[i % len(cfg.fisher_prompts)] for i in range(cfg.fisher_samples)]
        lat = ddim_latents(backend, prompts, cfg.seed + 10_000, cfg.sample_steps, cfg.guidance, resolution)
        return diagonal_fisher(backend, targets, lat.to(backend.dtype), _encode_unique(backend, prompts), cfg.seed)
    return fisher_prior(cached_fisher(fisher_cache_path(cache, backend, targets, spec), compute), cfg.prior_sigma)


@torch.no_grad()
def _error_profile(backend, latents, cond, seed) -> torch.Tensor:
    """The frozen model's mean denoising error on the forget set in N_BOUND_BUCKETS timestep
    buckets: the reference the plasticity bound is a multiple of."""
    g = torch.Generator().manual_seed(seed + 1)
    T = backend.schedule.num_train_timesteps
    prof = torch.zeros(N_BOUND_BUCKETS)
    for b in range(N_BOUND_BUCKETS):
        n = min(len(latents), 8)
        idx = torch.randperm(len(latents), generator=g)[:n]
        t = torch.randint(b * T // N_BOUND_BUCKETS, (b + 1) * T // N_BOUND_BUCKETS, (n,), generator=g)
        x0 = latents[idx].to(backend.device, backend.dtype)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        t = t.to(backend.device)
        pred = backend.denoise(backend.schedule.add_noise(x0, eps, t), t, cond_index(cond, idx.to(x0.device)))
        prof[b] = denoising_error(pred, backend.schedule.target(x0, eps, t)).mean().cpu()
    return prof


def unlearn(backend: Backend, config: UnlearnConfig, forget: Optional[ForgetSet] = None,
            progress: Optional[Progress] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> UnlearnResult:
    """Train LoRA deltas that make the model forget the concept. `progress(step, total, terms)`
    is called after every step (it may raise to cancel); `should_stop()` ends the run early,
    keeping what was learned so far. The backend's model is left exactly as it was."""
    cfg = config.validate()
    with torch.inference_mode(False), torch.enable_grad(), frozen(backend):
        return _run(backend, cfg, forget, progress, should_stop)


def _run(backend, cfg, forget, progress, should_stop) -> UnlearnResult:
    timings, t0 = {}, time.perf_counter()
    dev, resolution = backend.device, cfg.resolution or backend.resolution
    latents, captions = _forget_latents(backend, cfg, forget, resolution)
    cond = _encode_unique(backend, captions)
    extra = {}
    if cfg.objective == "esd":
        extra["uncond"] = backend.encode_text([""])
    if cfg.objective == "score_align":
        extra["anchor"] = backend.encode_text([cfg.anchor])
    timings["encode"] = time.perf_counter() - t0

    targets = select_targets(backend.targets(), cfg.layers, cfg.train_text_encoder)
    if not targets:
        raise VDUError(f"layer preset {cfg.layers!r} matches no layer of this model; choose --layers all")
    network = LoRANetwork(targets, cfg.rank, cfg.alpha, cfg.variational, seed=cfg.seed).to(dev)
    t0 = time.perf_counter()
    prior = _build_prior(backend, cfg, targets, resolution).to(dev) if cfg.objective == "vdu" else None
    timings["prior"] = time.perf_counter() - t0
    profile = _error_profile(backend, latents, cond, cfg.seed).to(dev) if cfg.objective == "vdu" else None

    g = torch.Generator().manual_seed(cfg.seed)
    T = backend.schedule.num_train_timesteps
    t_lo, t_hi = int(cfg.t_min * (T - 1)), max(int(cfg.t_max * (T - 1)), int(cfg.t_min * (T - 1)) + 1)
    opt = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=0.0)
    history, bounded_ema, n = [], 0.0, len(latents)
    t0 = time.perf_counter()
    with network.attached():
        for step in range(cfg.steps):
            idx = torch.randperm(n, generator=g)[:cfg.batch_size] if n > cfg.batch_size else \
                torch.randint(0, n, (cfg.batch_size,), generator=g)
            t = torch.randint(t_lo, t_hi + 1, (len(idx),), generator=g).to(dev)
            x0 = latents[idx].to(dev, backend.dtype)
            eps = torch.randn(x0.shape, generator=g).to(x0)
            x_t = backend.schedule.add_noise(x0, eps, t)
            c = (backend.encode_text([captions[i] for i in idx]) if cfg.train_text_encoder
                 else cond_index(cond, idx.to(dev)))
            network.train()
            network.resample()
            pred = backend.denoise(x_t, t, c)
            terms = {}
            if cfg.objective == "vdu":
                err = denoising_error(pred, backend.schedule.target(x0, eps, t))
                bound = cfg.bound * profile[(t * N_BOUND_BUCKETS // T).clamp(max=N_BOUND_BUCKETS - 1)]
                stability = prior(network.layers, network._current)
                loss = vdu_loss(stability, err, bound, cfg.gamma, n)
                if cfg.variational:
                    loss = loss - cfg.gamma * network.entropy().to(dev)  # KL = E_q[−log p] − H[q]
                frac = (err >= bound).float().mean().item()
                bounded_ema = frac if step == 0 else 0.9 * bounded_ema + 0.1 * frac
                terms.update(stability=stability.item(), forget_error=err.mean().item(),
                             bounded=bounded_ema)
            elif cfg.objective == "gradient_ascent":
                err = denoising_error(pred, backend.schedule.target(x0, eps, t))
                loss = gradient_ascent_loss(err)
                terms.update(forget_error=err.mean().item())
            else:
                with torch.no_grad(), network.disabled():
                    if cfg.objective == "esd":
                        both = backend.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), {
                            k: torch.cat([c[k], extra["uncond"][k].expand_as(c[k])]) for k in c})
                        f_c, f_u = both.chunk(2)
                    else:
                        f_a = backend.denoise(x_t, t, {k: extra["anchor"][k].expand_as(c[k]) for k in c})
                loss = esd_loss(pred, f_c, f_u, cfg.esd_eta) if cfg.objective == "esd" \
                    else score_align_loss(pred, f_a)
            if not math.isfinite(loss.item()):
                raise VDUError(f"the loss became {loss.item()} at step {step + 1}; lower --lr or raise --gamma")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            terms = {"loss": loss.item(), **terms}
            history.append({"step": step + 1, **terms})
            if progress:
                progress(step + 1, cfg.steps, terms)
            if (should_stop and should_stop()) or (
                    profile is not None and cfg.stop_when_bounded > 0 and step >= 10
                    and bounded_ema >= cfg.stop_when_bounded):
                break
    network.eval()
    network._current = {}
    timings["train"] = time.perf_counter() - t0
    return UnlearnResult(network.kohya_state_dict(), _metadata(backend, cfg, len(latents), len(history), targets),
                         history, timings, network)


def _metadata(backend, cfg, n_images, steps_done, targets) -> Dict[str, str]:
    """kohya's ss_* keys (so other tools recognise the file) plus the run's vdu_* settings."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_base_model_version": backend.base_model_version,
        "ss_training_comment": f"vdu-unlearn {cfg.objective}: forget {cfg.concept!r}",
        "vdu_objective": cfg.objective,
        "vdu_concept": cfg.concept,
        "vdu_anchor": cfg.anchor,
        "vdu_steps": str(steps_done),
        "vdu_steps_requested": str(cfg.steps),
        "vdu_gamma": str(cfg.gamma),
        "vdu_prior": cfg.prior,
        "vdu_prior_sigma": str(cfg.prior_sigma),
        "vdu_layers": cfg.layers,
        "vdu_lr": str(cfg.lr),
        "vdu_variational": str(cfg.variational).lower(),
        "vdu_seed": str(cfg.seed),
        "vdu_num_forget_images": str(n_images),
        "vdu_num_layers": str(len(targets)),
        "vdu_engine_version": __version__,
    }
