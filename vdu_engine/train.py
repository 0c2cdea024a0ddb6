"""`unlearn`: one run from a backend, a config and a forget set to a LoRA.

Order of work: validate → forget latents and text embeddings (once) → layers → prior → the
frozen model's error profile (for the plasticity bound) → optimisation → result. Nothing is
written to disk here except the Fisher cache; `UnlearnResult.save` writes the LoRA.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import __version__
from .backend import Backend, cond_cat, cond_index
from .config import UnlearnConfig
from .data import ForgetSet
from .distributed import Workers
from .errors import VDUError
from .layers import select_targets
from .lora import LoRANetwork
from .memory import autocast_dtype, checkpointed, modules_on, split, temporarily
from .objectives import (denoising_error, esd_loss, gradient_ascent_loss, score_align_loss,
                         vdu_loss)
from .prior import (PriorEnergy, cached_fisher, diagonal_fisher, ensemble_prior,
                    fisher_cache_path, fisher_prior, isotropic_prior)
from .sampling import ddim_latents
from .saving import atomic_save_file

Progress = Callable[[int, int, Dict[str, float]], None]
N_BOUND_BUCKETS = 10
PROFILE_SAMPLES = 32  # forget images per bucket: the bound scales with this estimate, and 8 let it move between seeds
PROFILE_PASS = 8  # images per no-grad forward of the profile and the replay pool: less memory than a training step
REPLAY_POOL = 128  # noisy replay latents whose frozen predictions are computed once (8 per Fisher image by default)


@dataclass
class UnlearnResult:
    lora: Dict[str, torch.Tensor]  # kohya state dict
    metadata: Dict[str, str]
    history: List[Dict[str, float]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    network: Optional[LoRANetwork] = None  # the trained deltas, e.g. to sample with them

    def save(self, path, overwrite: bool = False):
        return atomic_save_file(self.lora, path, self.metadata, overwrite=overwrite)


def frozen(backend: Backend):
    """No gradients for the model's own weights during the run; flags restored after."""
    return temporarily(backend.parameters(), lambda p: p.requires_grad, lambda p, f: p.requires_grad_(f), False)


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


def fisher_prompts(cfg, captions: List[str]) -> List[str]:
    """The prompts of the images the Fisher prior (and replay) is estimated on. By default: the
    unconditional prompt, and each forget caption that names the concept with the concept taken
    out ("a small red circle" → "a small circle"), so the weights the rest of those captions rely
    on are held tight and only what is specific to the concept is free to move. Captions that name
    it another way (a synonym) are left out: protecting them would protect the concept. Each
    concept to keep (`keep`) adds those captions with it in the concept's place ("a small orange
    circle"): without them, forgetting red drags its nearest neighbour along (it shifts every hue
    one step, red to orange and orange to yellow; README, "Keeping neighbours")."""
    base = list(cfg.fisher_prompts)
    if not cfg.concept.strip():
        return base or [""]
    word = re.compile(r"\b" + re.escape(cfg.concept.strip()) + r"\b", re.IGNORECASE)
    named = [c for c in captions if word.search(c)]
    if not base:
        base = [""] + sorted({" ".join(word.sub(" ", c).split()) for c in named} - {""})
    kept = sorted({word.sub(k.strip(), c) for k in cfg.keep for c in named} - set(base))
    return base + kept


def fisher_image_prompts(cfg, captions: List[str]) -> List[str]:
    """One prompt per Fisher image: the Fisher prompts spread evenly over the images, the
    unconditional one first. (Not the first ones in order: sorted captions would put only "a
    large …" prompts in when there are more prompts than images.)"""
    prompts, n = fisher_prompts(cfg, captions), cfg.fisher_samples
    return [prompts[i * len(prompts) // n] for i in range(n)]


def _fisher_images(backend, cfg, captions, resolution):
    """The images (latents) the model generates for the Fisher prompts, with their conditioning."""
    prompts = fisher_image_prompts(cfg, captions)
    lat = ddim_latents(backend, prompts, cfg.seed + 10_000, cfg.sample_steps, cfg.guidance, resolution)
    return lat, _encode_unique(backend, prompts)


def _build_prior(backend, cfg, targets, resolution, workers, captions, images) -> PriorEnergy:
    if cfg.prior == "isotropic":
        return isotropic_prior(cfg.prior_sigma)
    if cfg.prior == "ensemble":
        others = [backend.target_weights_from(path, [t.key for t in targets]) for path in cfg.ensemble]
        return ensemble_prior(targets, others, cfg.prior_sigma)
    spec = dict(n=cfg.fisher_samples, prompts=fisher_image_prompts(cfg, captions), res=resolution, seed=cfg.seed,
                steps=cfg.sample_steps, guidance=cfg.guidance)
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vdu-unlearn")

    def compute():
        lat, cond = images()
        prompts = spec["prompts"] if any(t.component != "unet" for t in targets) else None
        return diagonal_fisher(backend, targets, lat.to(backend.dtype), cond, cfg.seed, prompts)
    path = fisher_cache_path(cache, backend, targets, spec)
    if not workers.is_main:
        workers.barrier()  # the main process computes and caches it; the others read it
    fisher = cached_fisher(path, compute)
    if workers.is_main:
        workers.barrier()
    return fisher_prior(fisher, cfg.prior_sigma)


@torch.no_grad()
def _error_profile(backend, latents, cond, seed) -> torch.Tensor:
    """The frozen model's mean denoising error on the forget set in N_BOUND_BUCKETS timestep
    buckets: the reference the plasticity bound is a multiple of."""
    g = torch.Generator().manual_seed(seed + 1)
    T = backend.schedule.num_train_timesteps
    prof = torch.zeros(N_BOUND_BUCKETS)
    for b in range(N_BOUND_BUCKETS):
        n = min(len(latents), PROFILE_SAMPLES)
        idx = torch.randperm(len(latents), generator=g)[:n]
        t = torch.randint(b * T // N_BOUND_BUCKETS, (b + 1) * T // N_BOUND_BUCKETS, (n,), generator=g)
        x0 = latents[idx].to(backend.device, backend.dtype)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        t, idx = t.to(backend.device), idx.to(backend.device)
        errs = []
        for c in range(0, n, PROFILE_PASS):
            s = slice(c, c + PROFILE_PASS)
            pred = backend.denoise(backend.schedule.add_noise(x0[s], eps[s], t[s]), t[s], cond_index(cond, idx[s]))
            errs.append(denoising_error(pred, backend.schedule.target(x0[s], eps[s], t[s])))
        prof[b] = torch.cat(errs).mean().cpu()
    return prof


def _denoise(backend, amp, x_t, t, c):
    """The model's prediction under the run's autocast precision (None: the model's own)."""
    with torch.autocast(backend.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return backend.denoise(x_t, t, c)


@torch.no_grad()
def _replay_pool(backend, images, seed, amp) -> Dict[str, torch.Tensor]:
    """REPLAY_POOL noisy versions of the model's own images for the Fisher prompts, with the
    frozen model's predictions on them, computed once before training: a step then replays rows
    of the pool inside its own forward pass, with no frozen forward of its own."""
    lat, cond = images
    g = torch.Generator().manual_seed(seed + 3)
    i = torch.arange(REPLAY_POOL) % len(lat)
    t = torch.randint(0, backend.schedule.num_train_timesteps, (REPLAY_POOL,), generator=g).to(backend.device)
    x0 = lat[i].to(backend.device, backend.dtype)
    x_t = backend.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t)
    i = i.to(backend.device)
    ref = torch.cat([_denoise(backend, amp, x_t[s], t[s], cond_index(cond, i[s])).float()
                     for s in (slice(a, a + PROFILE_PASS) for a in range(0, REPLAY_POOL, PROFILE_PASS))])
    return {"x_t": x_t, "t": t, "row": i, "ref": ref, "cond": cond}


def unlearn(backend: Backend, config: UnlearnConfig, forget: Optional[ForgetSet] = None,
            progress: Optional[Progress] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> UnlearnResult:
    """Train LoRA deltas that make the model forget the concept. `progress(step, total, terms)`
    is called after every step (it may raise to cancel); `should_stop()` ends the run early,
    keeping what was learned so far. The backend's model is left exactly as it was."""
    cfg = config.validate()
    with torch.inference_mode(False), torch.enable_grad(), frozen(backend):
        return _run(backend, cfg, forget, progress, should_stop)


@contextmanager
def _memory_savers(backend: Backend, cfg: UnlearnConfig):
    """Gradient checkpointing and encoder offload for the training loop, undone after it."""
    with ExitStack() as stack:
        if cfg.gradient_checkpointing:
            blocks = backend.checkpoint_blocks()
            if not blocks:
                raise VDUError("this model has no blocks gradient checkpointing knows; drop --gradient-checkpointing")
            stack.enter_context(checkpointed(blocks))
        if cfg.offload_encoders and backend.device.type != "cpu":
            stack.enter_context(modules_on(backend.encoder_modules(), "cpu"))
        yield


def _passes(mine: slice, micro_batch_size: int) -> List[slice]:
    """This process's slice of the step's batch, in forward/backward passes of at most
    `micro_batch_size` images (0: one pass)."""
    size = micro_batch_size or (mine.stop - mine.start)
    return [slice(a, min(a + size, mine.stop)) for a in range(mine.start, mine.stop, size)]


def _run(backend, cfg, forget, progress, should_stop) -> UnlearnResult:
    workers = Workers()
    if cfg.batch_size < workers.world:
        raise VDUError(f"--batch-size {cfg.batch_size} cannot be split over {workers.world} processes; "
                       f"raise it to at least {workers.world}")
    timings, t0 = {}, time.perf_counter()
    dev, resolution = backend.device, cfg.resolution or backend.resolution
    amp = autocast_dtype(cfg.precision, dev, backend.dtype)
    latents, captions = _forget_latents(backend, cfg, forget, resolution)
    latents = workers.broadcast(latents.contiguous())
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
    generated = []  # the Fisher images, made once for the prior (on a cold cache) and replay

    def images():
        if not generated:
            generated.append(_fisher_images(backend, cfg, captions, resolution))
        return generated[0]
    prior = (_build_prior(backend, cfg, targets, resolution, workers, captions, images).to(dev)
             if cfg.objective == "vdu" else None)
    timings["prior"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    profile = (workers.broadcast(_error_profile(backend, latents, cond, cfg.seed).to(dev))
               if cfg.objective == "vdu" else None)
    timings["profile"] = time.perf_counter() - t0
    if cfg.objective == "vdu" and cfg.replay > 0:
        t0 = time.perf_counter()
        extra["replay"] = _replay_pool(backend, images(), cfg.seed, amp)
        timings["replay"] = time.perf_counter() - t0

    g = torch.Generator().manual_seed(cfg.seed)
    T = backend.schedule.num_train_timesteps
    t_lo, t_hi = int(cfg.t_min * (T - 1)), max(int(cfg.t_max * (T - 1)), int(cfg.t_min * (T - 1)) + 1)
    params = list(network.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    step_terms = Terms(backend, cfg, network, prior, profile, extra, amp, len(latents))
    mine = split(cfg.batch_size, workers.world)[workers.rank]
    history, bounded_ema, n = [], 0.0, len(latents)
    t0 = time.perf_counter()
    with network.attached(), _memory_savers(backend, cfg):
        for step in range(cfg.steps):
            # The whole step's batch is drawn on every process; each trains on its slice.
            idx = torch.randperm(n, generator=g)[:cfg.batch_size] if n > cfg.batch_size else \
                torch.randint(0, n, (cfg.batch_size,), generator=g)
            t = torch.randint(t_lo, t_hi + 1, (len(idx),), generator=g).to(dev)
            x0 = latents[idx].to(dev, backend.dtype)
            eps = torch.randn(x0.shape, generator=g).to(x0)
            network.train()
            network.resample()
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(len(Terms.NAMES) + 1, device=dev)  # the loss, then the terms
            replay = step_terms.draw_replay()
            for part in _passes(mine, cfg.micro_batch_size):
                c = (backend.encode_text([captions[i] for i in idx[part]]) if cfg.train_text_encoder
                     else cond_index(cond, idx[part].to(dev)))
                loss, terms = step_terms(x0[part], eps[part], t[part], c,
                                         None if replay is None else replay[step_terms.replay_rows(part)])
                share = (part.stop - part.start) / cfg.batch_size  # passes add up to the batch mean
                scaler.scale(loss * share).backward()
                stats += share * torch.stack([loss.detach().float(), *terms])
            stats = workers.sum_gradients(params, stats).tolist()  # the one host sync of a step
            if not math.isfinite(stats[0]):
                raise VDUError(f"the loss became {stats[0]} at step {step + 1}; lower --lr or raise --gamma")
            scaler.step(opt)
            scaler.update()
            terms = dict(zip(("loss",) + Terms.NAMES, stats))
            bounded_ema = terms["bounded"] if step == 0 else 0.9 * bounded_ema + 0.1 * terms["bounded"]
            terms = {k: (bounded_ema if k == "bounded" else v) for k, v in terms.items()
                     if k in Terms.REPORTED[cfg.objective]}
            history.append({"step": step + 1, **terms})
            if progress and workers.is_main:
                progress(step + 1, cfg.steps, terms)
            if should_stop is not None and workers.main_says(should_stop() if workers.is_main else False):
                break
            if profile is not None and cfg.stop_when_bounded > 0 and step >= 10 and bounded_ema >= cfg.stop_when_bounded:
                break
    network.eval()
    network.forget_sample()
    timings["train"] = time.perf_counter() - t0
    return UnlearnResult(network.kohya_state_dict(), _metadata(backend, cfg, len(latents), len(history), targets),
                         history, timings, network)


class Terms:
    """One forward/backward pass of the chosen objective on a slice of the batch: its loss and
    the statistics the progress bar shows (each a 0-dim tensor, summed over passes)."""

    NAMES = ("stability", "forget_error", "bounded")
    REPORTED = {"vdu": ("loss", "stability", "forget_error", "bounded"),
                "gradient_ascent": ("loss", "forget_error"), "esd": ("loss",), "score_align": ("loss",)}

    def __init__(self, backend, cfg, network, prior, profile, extra, amp, n_forget):
        self.b, self.cfg, self.network, self.prior, self.profile = backend, cfg, network, prior, profile
        self.extra, self.amp, self.n_forget = extra, amp, n_forget
        self.n_replay = cfg.replay_batch or cfg.batch_size
        self.rg = torch.Generator().manual_seed(cfg.seed + 3)  # the replay draws

    def draw_replay(self) -> Optional[torch.Tensor]:
        """A step's replay rows of the pool, drawn once per step so that micro-batches and
        processes split the same draw."""
        if "replay" not in self.extra:
            return None
        return torch.randint(0, REPLAY_POOL, (self.n_replay,), generator=self.rg)

    def replay_rows(self, part: slice) -> slice:
        """The replay rows that go with a slice of the forget batch: the same share of them."""
        scale = self.n_replay / self.cfg.batch_size
        return slice(round(part.start * scale), round(part.stop * scale))

    def _denoise(self, x_t, t, c):
        return _denoise(self.b, self.amp, x_t, t, c)

    def __call__(self, x0, eps, t, c, replay=None):
        b, cfg = self.b, self.cfg
        zero = torch.zeros((), device=x0.device)
        x_t = b.schedule.add_noise(x0, eps, t)
        drift = zero
        if replay is not None and len(replay):  # the replay rows ride in the same forward pass
            pool = self.extra["replay"]
            rows = replay.to(pool["row"].device)
            pred, pred_r = self._denoise(torch.cat([x_t, pool["x_t"][rows]]), torch.cat([t, pool["t"][rows]]),
                                         cond_cat([c, cond_index(pool["cond"], pool["row"][rows])])
                                         ).split([len(x0), len(rows)])
            # E‖ε_θ(x'_t, t, c') − ε_θ*(x'_t, t, c')‖² on the model's own images for the Fisher
            # prompts: the Laplace prior's quadratic form with the full Gauss–Newton matrix,
            # estimated by samples, where the diagonal Fisher keeps only its diagonal. Summed over
            # the pass's rows and divided by its share of the batch: passes add up to the mean.
            drift = denoising_error(pred_r, pool["ref"][rows]).sum() * cfg.batch_size / (len(x0) * self.n_replay)
        else:
            pred = self._denoise(x_t, t, c)
        if cfg.objective in ("vdu", "gradient_ascent"):
            err = denoising_error(pred, b.schedule.target(x0, eps, t))
            if cfg.objective == "gradient_ascent":
                return gradient_ascent_loss(err), (zero, err.mean().detach(), zero)
            T = b.schedule.num_train_timesteps
            bound = cfg.bound * self.profile[(t * N_BOUND_BUCKETS // T).clamp(max=N_BOUND_BUCKETS - 1)]
            stability = self.prior(self.network.layers, self.network.current_factors())
            stability = stability + cfg.replay * self.n_forget * drift
            loss = vdu_loss(stability, err, bound, cfg.gamma, self.n_forget)
            if cfg.variational:
                loss = loss - cfg.gamma * self.network.entropy().to(loss.device)  # KL = E_q[−log p] − H[q]
            return loss, (stability.detach(), err.mean().detach(), (err >= bound).float().mean())
        with torch.no_grad(), self.network.disabled():
            if cfg.objective == "esd":
                u = self.extra["uncond"]
                f_c, f_u = self._denoise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                         {k: torch.cat([c[k], u[k].expand_as(c[k])]) for k in c}).chunk(2)
            else:
                f_a = self._denoise(x_t, t, {k: self.extra["anchor"][k].expand_as(c[k]) for k in c})
        loss = esd_loss(pred, f_c, f_u, cfg.esd_eta) if cfg.objective == "esd" else score_align_loss(pred, f_a)
        return loss, (zero, zero, zero)


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
        "vdu_replay": str(cfg.replay),
        "vdu_replay_batch": str(cfg.replay_batch or cfg.batch_size),
        "vdu_keep": ", ".join(cfg.keep),
        "vdu_layers": cfg.layers,
        "vdu_lr": str(cfg.lr),
        "vdu_variational": str(cfg.variational).lower(),
        "vdu_seed": str(cfg.seed),
        "vdu_num_forget_images": str(n_images),
        "vdu_num_layers": str(len(targets)),
        "vdu_engine_version": __version__,
    }
