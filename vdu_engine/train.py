"""`unlearn`: one run from a backend, a config and a forget set to a LoRA.

The phases of a run, each a function below:
1. `Run.setup`: validate, encode the forget set once, find the concept's synonyms and neighbours
   (neighbours.py), choose the layers and build the LoRA network;
2. the objective prepares what it needs (objectives.py: pools of frozen predictions, the prior,
   each forget row's plasticity bound);
3. `_optimise`: the training loop, the same for every objective;
4. the result: the LoRA's kohya state dict and the run's metadata.
A VDU run whose concept is one word of the text encoder, met in context, trains the text encoder's deltas
(text_remap.py: the concept's word read as its destination's in every context); others train the UNet's.
Nothing is written to disk here except the Fisher cache; `UnlearnResult.save` writes the LoRA.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import __version__, text_remap
from .backend import Backend, cond_index
from .config import UnlearnConfig
from .data import ForgetSet
from .distributed import Workers
from .errors import VDUError, require_finite
from .layers import select_targets
from .lora import LoRANetwork
from .memory import autocast_dtype, checkpointed, modules_on, split, temporarily
from .destination import Destination, nearest_neighbour, note as destination_note, plan
from .neighbours import Vicinity, caption_words, classify, nearest_words, without, word_pattern
from .objectives import REGISTRY
from .text_remap import TextVDU
from .pools import PredictionPool, encoded_per_row
from .prior import (PriorEnergy, cached_fisher, diagonal_fisher, ensemble_prior,
                    fisher_cache_path, fisher_prior, isotropic_prior)
from .sampling import ddim_latents
from .saving import atomic_save_file

Progress = Callable[[int, int, Dict[str, float]], None]
LATENTS_NAN = "the VAE returned non-finite latents (nan/inf) for {bad} of {total} images"
FISHER_NAN = "the Fisher prior's estimate is non-finite (nan/inf) in {bad} of {total} layers"


@dataclass
class UnlearnResult:
    lora: Dict[str, torch.Tensor]  # kohya state dict
    metadata: Dict[str, str]
    history: List[Dict[str, float]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    network: Optional[LoRANetwork] = None  # the trained deltas, e.g. to sample with them

    def save(self, path, overwrite: bool = False):
        return atomic_save_file(self.lora, path, self.metadata, overwrite=overwrite)

    def summary(self) -> str:
        """One line for the user, from the metadata: where the concept went, what went with it, what was held.
        A word given alone is read as a word the run had to guess (text_remap.py): the line says how to choose it."""
        meta = self.metadata
        text = meta.get("vdu_text_destination", "off")
        where = meta.get("vdu_destination_used", "") if text.startswith("off") else text.split("; ")[0]
        parts = [f"where the concept goes: {where}"] if where else []
        if text_remap.ALONE in text:
            parts.append("it was given alone, so that word is a guess: if it is not of the concept's kind, give an "
                         "anchor or prompts that use the concept")
        for key, label in (("vdu_synonyms_found", "forgotten with it"), ("vdu_neighbours_held", "held")):
            if meta.get(key):
                parts.append(f"{label}: {meta[key]}")
        return "; ".join(parts)


def frozen(backend: Backend):
    """No gradients for the model's own weights during the run; flags restored after."""
    return temporarily(backend.parameters(), lambda p: p.requires_grad, lambda p, f: p.requires_grad_(f), False)


def _forget_latents(backend, cfg, forget, resolution):
    """Latents [N, ...] and captions of the forget set, encoded once."""
    if forget is None:
        if not cfg.concept.strip():
            raise VDUError("nothing to forget: give a folder of images (--images) or a concept prompt (--concept)")
        prompts = _prompt_only_captions(cfg)
        lat = ddim_latents(backend, prompts, cfg.seed, cfg.sample_steps, cfg.guidance, resolution)
        return lat, prompts
    if cfg.forget_prompts:
        raise VDUError("forget prompts are for prompt-only runs: with images, their captions say what they show; "
                       "drop --forget-prompts or the images")
    if len(forget) == 0:
        raise VDUError("the forget set is empty; add images of the concept")
    captions = forget.captions_for(cfg.concept)
    pixels = forget.pixels(resolution)
    with torch.no_grad():
        lat = torch.cat([backend.encode_images(pixels[i:i + 8].to(backend.device))
                         for i in range(0, len(pixels), 8)]).float()
    # The pixels are finite (data.py), so nan/inf here is the VAE's: the SDXL VAE overflows in fp16.
    lat = require_finite(lat, LATENTS_NAN, backend.fixes["vae"])
    if cfg.objective != "vdu" or not cfg.own_forget_images:
        return lat, captions
    own, own_captions = _own_renderings(backend, cfg, captions, resolution)
    return torch.cat([lat, own.float()]), list(captions) + own_captions


def _own_renderings(backend, cfg, captions: List[str], resolution):
    """The frozen model's own images for the forget captions, --fisher-samples of them spread evenly over
    the captions, as many as the destination draws. The images show the concept as the user photographed it; these
    show it as the model draws it, which is what sampling visits. From 8 circle images they carry the
    forgetting to most circle prompts (25 → 6 % left; docs/quality/tuning.md, "Stop 36" and "Stop 37")."""
    own_captions = spread(captions, cfg.fisher_samples)
    lat = ddim_latents(backend, own_captions, cfg.seed + 30_000, cfg.sample_steps, cfg.guidance, resolution)
    return lat, own_captions


def _prompt_only_captions(cfg) -> List[str]:
    """The captions of a prompt-only forget set: the forget prompts in turn, else the concept alone.
    A word alone teaches the model to forget the word alone; prompts that use the concept the way
    users write it carry the forgetting to those prompts (docs/quality/tuning.md, 2026-12-04)."""
    prompts = [p.strip() for p in cfg.forget_prompts if p.strip()] or [cfg.concept.strip()]
    named = word_pattern([cfg.concept])
    stray = [p for p in prompts if not named.search(p)]
    if stray:
        raise VDUError(f"the forget prompt {stray[0]!r} does not name the concept {cfg.concept.strip()!r}; "
                       "write the concept's word in every forget prompt")
    return [prompts[i % len(prompts)] for i in range(cfg.num_images)]


def _encode_unique(backend, prompts):
    """Each distinct prompt through the text encoder once; rows gathered per prompt."""
    cond, index = encoded_per_row(backend, prompts)
    return cond_index(cond, index.to(next(iter(cond.values())).device))


def fisher_prompts(cfg, captions: List[str], neighbours: List[str] = (), synonyms: List[str] = ()) -> List[str]:
    """The preservation prompts: the prompts of the images the Fisher prior and replay are
    measured on. By default: the unconditional prompt, and each forget caption that names the
    concept with the concept taken out ("a small red circle" → "a small circle"), so the weights
    the rest of those captions rely on are held tight and only what is specific to the concept is
    free to move. Captions that name it another way (a synonym) are left out: protecting them
    would protect the concept. Each neighbour (found by neighbours.classify, or named in `keep`)
    adds those captions with it in the concept's place ("a small orange circle"): without them,
    forgetting red drags its nearest neighbour along."""
    base = list(cfg.fisher_prompts)
    if not cfg.concept.strip():
        return base or [""]
    word = word_pattern([cfg.concept, *synonyms])
    concept = word_pattern([cfg.concept])
    named = [c for c in captions if concept.search(c)]
    if not base:
        base = [""] + sorted({without(c, word) for c in captions if word.search(c)} - {""})
    held = list(dict.fromkeys([k.strip() for k in cfg.keep] + list(neighbours)))
    kept = sorted({concept.sub(k, c) for k in held for c in named} - set(base))
    return base + kept


def fisher_image_prompts(cfg, captions: List[str], neighbours: List[str] = (), synonyms: List[str] = (),
                         prefixes: List[str] = ()) -> List[str]:
    """One prompt per Fisher image: the preservation prompts spread evenly over the images, the
    unconditional one first. (Not the first ones in order: sorted captions would put only "a
    large …" prompts in when there are more prompts than images.) The forget captions cut after the
    concept (`prefixes`, see `Run._caption_variants`) add their own preservation prompts after the whole
    captions' ("a small orange circle" → "a small orange", "a small orange square"): the prefix that
    carries the forgetting to settings no caption names also holds the rest of the model there (circle
    from 8 images: retain 38.5 → 42.1 %; docs/quality/tuning.md, "Stop 39")."""
    whole = fisher_prompts(cfg, captions, neighbours, synonyms)
    cut = fisher_prompts(cfg, list(prefixes), neighbours, synonyms)  # the user's own prompts: all in `whole` already
    return spread(whole + [p for p in cut if p not in whole], cfg.fisher_samples)


def spread(items: List[str], n: int) -> List[str]:
    """n picks spread evenly over items, in order (each item repeated when n exceeds them)."""
    return [items[i * len(items) // n] for i in range(n)]


def _build_prior(run) -> PriorEnergy:
    backend, cfg, targets, workers = run.backend, run.cfg, run.targets, run.workers
    if cfg.prior == "isotropic":
        return isotropic_prior(cfg.prior_sigma)
    if cfg.prior == "ensemble":
        others = [backend.target_weights_from(path, [t.key for t in targets]) for path in cfg.ensemble]
        return ensemble_prior(targets, others, cfg.prior_sigma)
    spec = dict(n=cfg.fisher_samples, prompts=run.image_prompts, res=run.resolution, seed=cfg.seed,
                steps=cfg.sample_steps, guidance=cfg.guidance)
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vdu-unlearn")

    def compute():
        lat, cond = run.images()
        prompts = spec["prompts"] if any(t.component != "unet" for t in targets) else None
        fisher = diagonal_fisher(backend, targets, lat.to(backend.dtype), cond, cfg.seed, prompts)
        return _finite_fisher(fisher, backend.fixes["fisher"])  # checked before it is cached
    path = fisher_cache_path(cache, backend, targets, spec)
    if not workers.is_main:
        workers.barrier()  # the main process computes and caches it; the others read it
    fisher = cached_fisher(path, compute)
    if workers.is_main:
        workers.barrier()
    # Versions before this check cached nan estimates; the cache key ignores the dtype, so fp32 reads them too.
    return fisher_prior(_finite_fisher(fisher, f"delete {path}, cached by an earlier failed run"), cfg.prior_sigma)


def _finite_fisher(fisher: Dict[str, torch.Tensor], fix: str) -> Dict[str, torch.Tensor]:
    """The estimate, if every layer's is finite. One row per layer: its largest magnitude (nan stays nan)."""
    require_finite(torch.stack([f.abs().amax() for f in fisher.values()]), FISHER_NAN, fix)
    return fisher


def _denoise(backend, amp, x_t, t, c):
    """The model's prediction under the run's autocast precision (None: the model's own)."""
    with torch.autocast(backend.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return backend.denoise(x_t, t, c)


class Run:
    """What every objective may read: the model, the settings, the encoded forget set with its
    captions (and their synonym variants), the concept's vicinity and the LoRA network."""

    def __init__(self, backend: Backend, cfg: UnlearnConfig):
        self.backend, self.cfg, self.workers = backend, cfg, Workers()
        if cfg.batch_size < self.workers.world:
            raise VDUError(f"--batch-size {cfg.batch_size} cannot be split over {self.workers.world} processes; "
                           f"raise it to at least {self.workers.world}")
        self.timings: Dict[str, float] = {}
        self.resolution = cfg.resolution or backend.resolution
        self.amp = autocast_dtype(cfg.precision, backend.device, backend.dtype)
        T = backend.schedule.num_train_timesteps
        lo = int(cfg.t_min * (T - 1))
        self.t_range = (lo, max(int(cfg.t_max * (T - 1)), lo + 1))
        self._generated = []
        self.destination: Optional[Destination] = None  # set by destination_pool

    # --- phase 1: the forget set, the vicinity, the network -------------------------------
    def setup(self, forget):
        t0 = time.perf_counter()
        latents, self.captions = _forget_latents(self.backend, self.cfg, forget, self.resolution)
        self.latents = self.workers.broadcast(latents.contiguous())
        self.n_forget = len(self.latents)  # N of the loss: the user's images and the model's own renderings
        self.n_own = self.n_forget - (len(forget) if forget is not None else self.n_forget)
        self.vicinity = self._find_vicinity()
        self._caption_variants()
        self.timings["encode"] = time.perf_counter() - t0
        self.text_plan = self._text_plan()
        if self.in_text:
            self.targets = [t for t in self.backend.targets() if t.component != "unet"]
        else:
            self.targets = select_targets(self.backend.targets(), self.cfg.layers, self.cfg.train_text_encoder)
        if not self.targets:
            raise VDUError(f"layer preset {self.cfg.layers!r} matches no layer of this model; choose --layers all")
        self.network = LoRANetwork(self.targets, self.cfg.rank, self.cfg.alpha, self.cfg.variational,
                                   seed=self.cfg.seed).to(self.backend.device)
        self.image_prompts = fisher_image_prompts(self.cfg, self.captions, self.vicinity.neighbours,
                                                  self.vicinity.synonyms, sorted(self.prefixes))
        return self

    def _text_plan(self) -> Optional[text_remap.TextPlan]:
        """Where the concept goes in the text encoder (text_remap.py); None when the run does not ask."""
        cfg = self.cfg
        if cfg.objective != "vdu" or not cfg.text_destination or cfg.train_text_encoder or not cfg.concept.strip():
            return None
        t0 = time.perf_counter()
        found = text_remap.plan(self)
        self.timings["text_plan"] = time.perf_counter() - t0
        return found

    @property
    def in_text(self) -> bool:
        """Whether this run trains the concept's destination into the text encoder (not the UNet)."""
        return self.text_plan is not None and self.text_plan.destination is not None

    def _find_vicinity(self) -> Vicinity:
        """The concept's synonyms (forgotten with it) and neighbours (held), from the words nearest
        to it that the frozen model tells apart (`--neighbours` candidates; 0: none)."""
        cfg = self.cfg
        if cfg.objective != "vdu" or cfg.neighbours <= 0 or not cfg.concept.strip():
            return Vicinity()
        exclude = {k.strip().lower() for k in cfg.keep} | caption_words(self.captions, cfg.concept.strip())
        candidates = nearest_words(self.backend, cfg.concept.strip(), cfg.neighbours, exclude)
        with torch.no_grad():
            return classify(self.backend, self.latents, self.captions, cfg.concept.strip(), candidates, cfg.seed)

    def _caption_variants(self):
        """Every caption a forget image is trained with: its own, its synonyms' versions of it and (`--concept-prefix`)
        its prefix through the concept. CLIP's text encoder is causal: the tokens up to the concept are encoded the
        same in every prompt that goes on from them, while the words after it ("on a grey background") spell the
        concept differently in each setting. Forgetting the prefix too reaches settings no caption names (circle
        from 8 images: 17 → 10 % left on grey backgrounds, colour kept 94.4 → 96.8 %; docs/quality/tuning.md,
        "Stop 38"). Prefixes train the forget terms only: the destination draws for whole captions."""
        concept = word_pattern([self.cfg.concept]) if self.cfg.concept.strip() else None
        self.all_captions, self.variants, whole, cut = [], [], set(), set()
        for c in self.captions:
            named = concept.search(c) if concept is not None else None
            versions = [c] + ([concept.sub(s, c) for s in self.vicinity.synonyms] if named else [])
            whole.update(versions)
            if named and self.cfg.objective == "vdu" and self.cfg.concept_prefix and named.end() < len(c.rstrip()):
                cut.add(c[:named.end()])
                versions.append(c[:named.end()])
            self.variants.append([self._caption_index(v) for v in versions])
        self.prefixes = cut - whole  # a prefix that is also some image's whole caption stays a caption
        self.n_prefixes = len(cut)
        self.cond = _encode_unique(self.backend, self.all_captions)
        self.concept_words = word_pattern([self.cfg.concept, *self.vicinity.synonyms]) if concept else None

    def _caption_index(self, caption: str) -> int:
        if caption not in self.all_captions:
            self.all_captions.append(caption)
        return self.all_captions.index(caption)

    # --- what the objectives use ----------------------------------------------------------
    def destination_prompt(self, caption_index: int) -> str:
        """c⁻: the anchor if one is given; else the caption without the concept (or its synonyms);
        a caption that names neither has the unconditional prompt as its destination."""
        if self.cfg.anchor:
            return self.cfg.anchor
        caption = self.all_captions[caption_index]
        if self.concept_words is None or not self.concept_words.search(caption):
            return ""
        if self.cfg.destination_mode == "neighbours" and self.vicinity.neighbours:
            return self.concept_words.sub(nearest_neighbour(self.vicinity), caption)
        return without(caption, self.concept_words)

    def destination_pool(self):
        """The destination's pool (destination.py, pools.py), or None when the run has none."""
        t0 = time.perf_counter()
        self.destination = plan(self)
        self.timings["destination"] = time.perf_counter() - t0
        if self.destination is None:
            return None
        return PredictionPool.of_destination(self, self.destination)

    def forget_cond(self, caption_index: torch.Tensor):
        if self.cfg.train_text_encoder:  # the text encoder is trained: encode inside the graph
            return self.backend.encode_text([self.all_captions[i] for i in caption_index.tolist()])
        return cond_index(self.cond, caption_index.to(self.backend.device))

    def denoise(self, x_t, t, c):
        return _denoise(self.backend, self.amp, x_t, t, c)

    def images(self):
        """The model's own images for the preservation prompts, with their conditioning (made once)."""
        if not self._generated:
            lat = ddim_latents(self.backend, self.image_prompts, self.cfg.seed + 10_000, self.cfg.sample_steps,
                               self.cfg.guidance, self.resolution)
            self._generated.append((lat, _encode_unique(self.backend, self.image_prompts)))
        return self._generated[0]

    def prior(self) -> PriorEnergy:
        t0 = time.perf_counter()
        prior = _build_prior(self).to(self.backend.device)
        self.timings["prior"] = time.perf_counter() - t0
        return prior

    def prior_energy(self, prior: PriorEnergy) -> torch.Tensor:
        return prior(self.network.layers, self.network.current_factors())


def unlearn(backend: Backend, config: UnlearnConfig, forget: Optional[ForgetSet] = None,
            progress: Optional[Progress] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> UnlearnResult:
    """Train LoRA deltas that make the model forget the concept. `progress(step, total, terms)`
    is called after every step (it may raise to cancel); `should_stop()` ends the run early,
    keeping what was learned so far. The backend's model is left exactly as it was."""
    cfg = config.validate()
    with torch.inference_mode(False), torch.enable_grad(), frozen(backend):
        run = Run(backend, cfg).setup(forget)                       # phase 1
        if cfg.objective == "uce":
            return _closed_form(run)
        t0 = time.perf_counter()
        objective = (TextVDU if run.in_text else REGISTRY[cfg.objective])(run)  # phase 2
        run.timings["prepare"] = time.perf_counter() - t0
        history = _optimise(run, objective, progress, should_stop)          # phase 3
        net = run.network
        net.eval()
        net.forget_sample()
        return UnlearnResult(net.kohya_state_dict(), _metadata(run, len(history)), history, run.timings, net)


@contextmanager
def _memory_savers(backend: Backend, cfg: UnlearnConfig, text: bool = False):
    """Gradient checkpointing and encoder offload for the training loop, undone after it (`text`: the loop
    trains the text encoder, which stays where it is)."""
    with ExitStack() as stack:
        if cfg.gradient_checkpointing:
            blocks = backend.checkpoint_blocks()
            if not blocks:
                raise VDUError("this model has no blocks gradient checkpointing knows; drop --gradient-checkpointing")
            stack.enter_context(checkpointed(blocks))
        if cfg.offload_encoders and not text and backend.device.type != "cpu":
            stack.enter_context(modules_on(backend.encoder_modules(), "cpu"))
        yield


def _passes(mine: slice, micro_batch_size: int) -> List[slice]:
    """This process's slice of the step's batch, in forward/backward passes of at most
    `micro_batch_size` images (0: one pass)."""
    size = micro_batch_size or (mine.stop - mine.start)
    return [slice(a, min(a + size, mine.stop)) for a in range(mine.start, mine.stop, size)]


def _optimise(run: Run, objective, progress, should_stop) -> List[Dict[str, float]]:
    """The training loop: every process draws the same batch, trains on its slice in passes,
    the gradients are summed, AdamW steps. Stops on `should_stop`, or when the objective says so."""
    cfg, dev, workers = run.cfg, run.backend.device, run.workers
    g = torch.Generator().manual_seed(cfg.seed)
    params = list(run.network.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=run.amp == torch.float16)
    names = ("loss",) + objective.reported
    mine = split(cfg.batch_size, workers.world)[workers.rank]
    history, ema = [], {}
    steps = getattr(objective, "steps", cfg.steps)  # the text encoder's run has its own budget (--text-steps)
    t0 = time.perf_counter()
    with run.network.attached(), _memory_savers(run.backend, cfg, run.in_text):
        for step in range(steps):
            batch = objective.draw(g)
            run.network.train()
            run.network.resample()
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(len(names), device=dev)
            for part in _passes(mine, cfg.micro_batch_size):
                loss, terms = objective.loss(batch, part)
                share = (part.stop - part.start) / cfg.batch_size  # passes add up to the batch mean
                scaler.scale(loss * share).backward()
                stats += share * torch.stack([loss.detach().float()] + [terms[k].float() for k in objective.reported])
            stats = workers.sum_gradients(params, stats).tolist()  # the one host sync of a step
            if not math.isfinite(stats[0]):  # every input was checked finite: the training itself diverged
                raise VDUError(f"the loss became {stats[0]} at step {step + 1}: the training diverged; "
                               f"{run.backend.fixes['lr']} (now {cfg.lr:g})")
            scaler.step(opt)
            scaler.update()
            terms = dict(zip(names, stats))
            ema = terms if step == 0 else {k: 0.9 * ema[k] + 0.1 * v for k, v in terms.items()}
            history.append({"step": step + 1, **{k: (ema[k] if k == "bounded" else v) for k, v in terms.items()}})
            if progress and workers.is_main:
                progress(step + 1, steps, history[-1])
            if should_stop is not None and workers.main_says(should_stop() if workers.is_main else False):
                break
            if step >= 10 and objective.should_stop(ema):
                break
    run.timings["train"] = time.perf_counter() - t0
    return history


def _closed_form(run: Run) -> UnlearnResult:
    """UCE: a closed-form edit, no training loop (uce.py)."""
    from .uce import uce_edit, uce_targets
    cfg, t0 = run.cfg, time.perf_counter()
    targets = uce_targets(run.backend.targets())
    erase = run.all_captions  # every forget caption and its synonyms' versions
    anchors = [run.destination_prompt(i) for i in range(len(erase))]
    preserve = run.image_prompts if not cfg.fisher_prompts else list(cfg.fisher_prompts)
    result = uce_edit(run.backend, targets, erase, anchors, preserve, cfg.rank, cfg.alpha,
                      preserve_scale=cfg.uce_preserve, lamb=cfg.uce_lambda, seed=cfg.seed)
    run.targets = targets
    run.timings["train"] = time.perf_counter() - t0
    worst = max(result.truncation_error.values(), default=0.0)
    meta = {**_metadata(run, 0), "vdu_uce_truncation_error_max": f"{worst:.4g}"}
    return UnlearnResult(result.network.kohya_state_dict(), meta, [], run.timings, result.network)


def _text_note(run: Run) -> str:
    """Whether the text encoder carries the destination, and how closely (text_remap.py)."""
    plan = getattr(run, "text_plan", None)
    if plan is None:
        return "off"
    if plan.destination is None:
        return plan.why
    return (f"{', '.join(plan.words)} read as {plan.destination!r} ({plan.why}); "
            f"{text_remap.gap_left(run):.2%} of the gap left on the captions")


def _metadata(run: Run, steps_done: int) -> Dict[str, str]:
    """kohya's ss_* keys (so other tools recognise the file) plus the run's vdu_* settings."""
    backend, cfg, n_images, targets = run.backend, run.cfg, run.n_forget, run.targets
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
        "vdu_hold_unconditional": str(cfg.hold_unconditional).lower(),
        "vdu_keep": ", ".join(cfg.keep),
        "vdu_forget_prompts": json.dumps(cfg.forget_prompts),  # a prompt may hold commas
        "vdu_destination": str(cfg.destination),
        "vdu_destination_used": "in the text encoder (vdu_text_destination)" if getattr(run, "in_text", False)
                                else destination_note(run.destination, run.cfg.destination),
        "vdu_plasticity": str(cfg.plasticity),
        "vdu_text_destination": _text_note(run),
        "vdu_text_steps": str(cfg.text_steps),
        "vdu_synonyms_found": ", ".join(run.vicinity.synonyms),
        "vdu_neighbours_held": ", ".join(run.vicinity.neighbours),
        "vdu_layers": cfg.layers,
        "vdu_lr": str(cfg.lr),
        "vdu_variational": str(cfg.variational).lower(),
        "vdu_seed": str(cfg.seed),
        "vdu_num_forget_images": str(n_images - run.n_own),
        "vdu_own_forget_images": str(run.n_own),
        "vdu_concept_prefixes": str(run.n_prefixes),  # captions also trained cut after the concept
        "vdu_num_layers": str(len(targets)),
        "vdu_engine_version": __version__,
    }
