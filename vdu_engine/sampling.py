"""A DDIM sampler with classifier-free guidance over any Backend.

The engine samples for three things: forget images in prompt-only mode, images for the Fisher
prior, and before/after grids. One sampler over `Backend.denoise` means the samples come from
exactly the network (and attached LoRA) the engine trains, for every backend. Each image gets
its own seed (seed + index), so the same prompt and seed give the same image in any batch.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from .backend import Backend, checked_text, cond_cat
from .errors import require_finite

SAMPLES_NAN = "the UNet's samples (the images the model generates itself) are non-finite (nan/inf) for {bad} of {total}"
DECODED_NAN = "the VAE decoded finite latents into non-finite images (nan/inf) for {bad} of {total}"


@torch.no_grad()
def ddim_latents(backend: Backend, prompts: List[str], seed: int, steps: int = 20,
                 guidance: float = 7.5, resolution: Optional[int] = None,
                 negative: Union[str, List[str]] = "", batch_size: int = 8,
                 seeds: Optional[List[int]] = None) -> torch.Tensor:
    """Scaled latents [N, C, h, w] for the prompts (deterministic DDIM, eta = 0). `negative` is the
    prompt guidance pushes away from (in place of the unconditional one): one for all, or one per prompt."""
    if not isinstance(negative, str) and len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
    resolution = resolution or backend.resolution
    seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
    sched = backend.schedule
    T = sched.num_train_timesteps
    ts = torch.linspace(T - 1, 0, steps).round().long()
    ac = sched.alphas_cumprod.float()
    uncond_one = checked_text(backend, [negative]) if isinstance(negative, str) else None
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        b = len(chunk)
        x = torch.stack([torch.randn(backend.latent_shape(resolution),
                                     generator=torch.Generator().manual_seed(s))
                         for s in seeds[start:start + b]]).to(backend.device, backend.dtype)
        uncond = (checked_text(backend, negative[start:start + b]) if uncond_one is None
                  else {k: v.expand(b, *v.shape[1:]) for k, v in uncond_one.items()})
        cond = cond_cat([uncond, checked_text(backend, chunk)])
        for i, t in enumerate(ts):
            tt = t.repeat(2 * b).to(backend.device)
            pred = backend.denoise(torch.cat([x, x]), tt, cond).float()
            p_u, p_c = pred.chunk(2)
            pred = p_u + guidance * (p_c - p_u)
            eps = sched.pred_to_eps(x.float(), pred, tt[:b])
            a = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x.float() - (1 - a).sqrt() * eps) / a.sqrt()
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(backend.dtype)
        out.append(x.float())
    # The prompts' embeddings were finite, so nan/inf here came from the UNet (or its dtype's range).
    return require_finite(torch.cat(out), SAMPLES_NAN, backend.fixes["unet"])


@torch.no_grad()
def ddim_sample(backend: Backend, prompts: List[str], seed: int, steps: int = 20,
                guidance: float = 7.5, resolution: Optional[int] = None, **kw) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1]."""
    lat = ddim_latents(backend, prompts, seed, steps, guidance, resolution, **kw)
    images = torch.cat([backend.decode_latents(lat[i:i + 64]) for i in range(0, len(lat), 64)])
    return require_finite(images, DECODED_NAN, backend.fixes["vae"])
