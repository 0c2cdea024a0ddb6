"""Train the mini Stable Diffusion from scratch on the procedural world (2 CPU cores, ~30 min).

    python -m miniworld.train --out models/miniworld
    python -m miniworld.train --out cache/retrained-red --exclude colour=red --vae-from models/miniworld

Phase 1 trains the VAE (reconstruction + a small KL term); phase 2 the UNet and the text encoder
together on frozen latents (ε-prediction, 10 % caption dropout so classifier-free guidance
works), with an EMA of the UNet, which is what gets saved. Seeded and deterministic on one
machine; the result loads with `StableDiffusionPipeline.from_pretrained(out)` offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dataset
from .model import MAX_TOKENS, build_scheduler, build_text_encoder, build_unet, build_vae, param_count
from .tokenizer import write_clip_tokenizer


def train_vae(images: torch.Tensor, steps: int, seed: int, log):
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (64,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)])


def train_denoiser(latents, captions, tokenizer, steps: int, seed: int, log, batch: int = 64, lr: float = 3e-3,
                   device: str = "cpu"):
    torch.manual_seed(seed)
    unet, text = build_unet().to(device), build_text_encoder(len(tokenizer)).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = build_scheduler()
    ac = noise_sched.alphas_cumprod
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1  # caption dropout → an unconditional model too
        tok[drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(device)  # drawn on the CPU: the same data on any device
        pred = unet(x_t, t.to(device), text(tok.to(device))[0]).sample
        loss = F.mse_loss(pred, eps.to(device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {loss.item():.4f}")
    return ema.cpu().eval(), text.cpu().eval(), noise_sched


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="diffusers folder to write")
    p.add_argument("--exclude", default=None,
                   help="leave a concept out of the data, e.g. colour=red, shape=circle or background=white")
    p.add_argument("--vae-from", default=None, help="reuse this model's VAE (and latent scale) instead of training one")
    p.add_argument("--images", type=int, default=30000, help="training images generated")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the UNet and text encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the UNet and text encoder train (cpu, cuda)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    exclude = dict([args.exclude.split("=")]) if args.exclude else None
    samples = dataset.generate(args.images, seed=args.seed, exclude=exclude)
    images = dataset.to_tensor(samples)
    log(f"generated {len(samples)} images (exclude={exclude})")
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
        scale = vae.config.scaling_factor
    else:
        vae = train_vae(images, args.vae_steps, args.seed, log)
    raw = encode_all(vae, images)
    if not args.vae_from:
        scale = float(1.0 / raw.std())  # SD's convention: scaled latents have unit variance
        vae.register_to_config(scaling_factor=scale)
    latents = raw * scale
    log(f"latents {tuple(latents.shape)} scale {scale:.4f}")
    tokenizer = write_clip_tokenizer(out / "tokenizer", dataset.vocabulary(), MAX_TOKENS)
    unet, text, sched = train_denoiser(latents, [s.caption for s in samples], tokenizer, args.unet_steps,
                                       args.seed, log, lr=args.lr, device=args.device)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    info = {"command": "python -m miniworld.train " + " ".join(argv or __import__("sys").argv[1:]),
            "seconds": round(time.time() - t_start, 1), "params": {
                "unet": param_count(unet), "vae": param_count(vae), "text_encoder": param_count(text)},
            "exclude": exclude, "images": args.images, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
            "lr": args.lr}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out}: {info['params']}")


if __name__ == "__main__":
    main()
