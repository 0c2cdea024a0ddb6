"""Pools of noisy latents made once before training, with the frozen model's predictions on them.

A training step then draws rows of a pool instead of running the frozen model itself: the
targets of ESD, score alignment and VDU's destination, and VDU's replayed predictions, each cost
one no-grad pass over the pool per run rather than one per step.
"""

from __future__ import annotations

from typing import Callable, List

import torch

from .backend import checked_text, cond_index
from .errors import require_finite

FORGET_POOL = 256  # noisy forget latents (16 per image for 16 images; a 200-step run draws 800 rows)
REPLAY_POOL = 128  # noisy latents of the model's own images for the preservation prompts
PASS = 8  # images per no-grad forward while a pool is made: less memory than a training step
FROZEN_NAN = "the frozen UNet's predictions (made before training) are non-finite (nan/inf) for {bad} of {total} inputs"


def encoded_per_row(backend, prompts: List[str]):
    """(cond, index): each distinct prompt through the text encoder once, and per prompt its row in cond."""
    uniq = sorted(set(prompts))
    with torch.no_grad():
        cond = checked_text(backend, uniq)
    return cond, torch.tensor([uniq.index(p) for p in prompts])


class PredictionPool:
    def __init__(self, x_t, t, caption, target=None, ref=None, cond=None):
        self.x_t, self.t, self.caption = x_t, t, caption  # caption: row → index of its conditioning
        self.target, self.ref, self.cond = target, ref, cond

    def __len__(self) -> int:
        return len(self.t)

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self), (n,), generator=g)

    @classmethod
    @torch.no_grad()
    def of_forget_set(cls, run) -> "PredictionPool":
        """FORGET_POOL noisy versions of the forget latents, at timesteps of the trained range, each
        with one of its image's captions (the caption itself, or a synonym's version of it)."""
        b, cfg = run.backend, run.cfg
        g = torch.Generator().manual_seed(cfg.seed + 11)
        lo, hi = run.t_range
        image = torch.arange(FORGET_POOL) % len(run.latents)
        image = image[torch.randperm(FORGET_POOL, generator=g)]
        caption = torch.tensor([run.variants[i][int(torch.randint(0, len(run.variants[i]), (1,), generator=g))]
                                for i in image.tolist()])
        t = torch.randint(lo, hi + 1, (FORGET_POOL,), generator=g)
        x0 = run.latents[image].to(b.device, b.dtype)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        t = t.to(b.device)
        return cls(b.schedule.add_noise(x0, eps, t), t, caption.to(b.device), target=b.schedule.target(x0, eps, t))

    def frozen(self, run, prompt_of: Callable[[int], str]) -> torch.Tensor:
        """ε* on every row for the prompt `prompt_of(caption index)` gives."""
        return self.frozen_per_row(run, [prompt_of(i) for i in self.caption.tolist()])[2]

    def frozen_per_row(self, run, prompts: List[str]):
        """(cond, index, ε*): ε* on row r for prompts[r], each distinct prompt encoded once (cond, with
        index: row → its prompt in cond)."""
        cond, index = encoded_per_row(run.backend, prompts)
        index = index.to(self.t.device)
        return cond, index, self._predict(run, cond, index)

    def frozen_named(self, run) -> torch.Tensor:
        """ε* on every row for its own caption."""
        return self._predict(run, run.cond, self.caption)

    @torch.no_grad()
    def _predict(self, run, cond, index) -> torch.Tensor:
        """The frozen model's prediction on every row, checked once here (the pool's inputs are finite), so an
        fp16 overflow of the UNet is named now rather than as a nan loss at step 1."""
        with run.network.disabled():
            pred = torch.cat([run.denoise(self.x_t[s], self.t[s], cond_index(cond, index[s])).float()
                              for s in (slice(a, a + PASS) for a in range(0, len(self), PASS))])
        return require_finite(pred, FROZEN_NAN, run.backend.fixes["unet"])

    @classmethod
    @torch.no_grad()
    def of_own_images(cls, run) -> "PredictionPool":
        """REPLAY_POOL noisy versions of the images the model generates for the preservation
        prompts, over the whole schedule, with the frozen model's predictions on them."""
        b = run.backend
        lat, cond = run.images()
        g = torch.Generator().manual_seed(run.cfg.seed + 3)
        row = torch.arange(REPLAY_POOL) % len(lat)
        t = torch.randint(0, b.schedule.num_train_timesteps, (REPLAY_POOL,), generator=g).to(b.device)
        x0 = lat[row].to(b.device, b.dtype)
        pool = cls(b.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t), t, row.to(b.device),
                   cond=cond)
        pool.ref = pool._predict(run, cond, pool.caption)
        return pool

    @classmethod
    @torch.no_grad()
    def of_destination(cls, run, dest) -> "PredictionPool":
        """REPLAY_POOL noisy versions of the destination's images (destination.py), over the whole
        schedule; each row is trained under the caption naming the concept (`caption`: its index in
        run.all_captions). `ref`: the frozen model's prediction for the row's destination prompt;
        `target`: its prediction for the caption naming the concept."""
        b = run.backend
        g = torch.Generator().manual_seed(run.cfg.seed + 13)
        row = torch.arange(REPLAY_POOL) % len(dest.latents)
        t = torch.randint(0, b.schedule.num_train_timesteps, (REPLAY_POOL,), generator=g).to(b.device)
        x0 = dest.latents[row].to(b.device, b.dtype)
        source = torch.tensor(dest.sources, device=b.device)[row.to(b.device)]
        pool = cls(b.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t), t, source)
        prompt_of = dict(zip(dest.sources, dest.prompts))  # a caption's destination prompt is always the same
        pool.ref, pool.target = pool.frozen(run, prompt_of.__getitem__), pool.frozen_named(run)
        return pool
