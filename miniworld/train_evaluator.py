"""Train the shape classifier of the evaluator and report its held-out accuracy.

    python -m miniworld.train_evaluator --out models/miniworld_evaluator
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import dataset
from .evaluator import ShapeNet, classify_colour


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image [N, 3, H, W] with its own σ (pixels): a decoder's soft edges,
    which the classifier must read the way a person does (a blurred square is still a square)."""
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 7]
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kx = k.repeat_interleave(c, 0)[:, None, None, :]
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kx.transpose(2, 3), groups=n * c)
    return y.reshape(n, c, h, w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    train = dataset.generate(args.images, seed=args.seed + 100)
    held = dataset.generate(2000, seed=args.seed + 200)  # different seed: unseen images
    x, y = dataset.to_tensor(train), torch.tensor([dataset.SHAPES.index(s.shape) for s in train])
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx]
        # Blur, brightness jitter and noise, so generated (imperfect) images classify too.
        xb = blur(xb, 1.2 * torch.rand(len(xb), generator=g))
        xb = (xb * (1 + 0.1 * torch.randn(len(xb), 1, 1, 1, generator=g))
              + 0.03 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(net(xb * 2 - 1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    hx = dataset.to_tensor(held)
    with torch.no_grad():
        pred = net(hx * 2 - 1).argmax(1)
        pred_blur = net(blur(hx, torch.full((len(hx),), 1.0)) * 2 - 1).argmax(1)
    labels = torch.tensor([dataset.SHAPES.index(s.shape) for s in held])
    shape_acc = float((pred == labels).float().mean())
    blur_acc = float((pred_blur == labels).float().mean())
    colour_acc = sum(c == s.colour for c, s in zip(classify_colour(hx), held)) / len(held)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "shape_net.safetensors"))
    info = {"held_out_shape_accuracy": round(shape_acc, 4), "held_out_shape_accuracy_blur1px": round(blur_acc, 4),
            "held_out_colour_accuracy": round(colour_acc, 4),
            "held_out_images": len(held), "train_images": len(train), "steps": args.steps,
            "seconds": round(time.time() - t0, 1),
            "command": "python -m miniworld.train_evaluator " + " ".join(argv or sys.argv[1:])}
    (out / "evaluator.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
