"""Train the shape classifier of the evaluator and report its held-out accuracy.

    python -m miniworld.train_evaluator --out models/miniworld_evaluator
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import dataset
from .evaluator import ShapeNet, classify_colour


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
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
        # Light jitter of brightness and noise so generated (slightly imperfect) images classify too.
        xb = (xb * (1 + 0.1 * torch.randn(len(xb), 1, 1, 1, generator=g)) + 0.03 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(net(xb * 2 - 1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    hx = dataset.to_tensor(held)
    with torch.no_grad():
        pred = net(hx * 2 - 1).argmax(1)
    shape_acc = float((pred == torch.tensor([dataset.SHAPES.index(s.shape) for s in held])).float().mean())
    colour_acc = sum(c == s.colour for c, s in zip(classify_colour(hx), held)) / len(held)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "shape_net.safetensors"))
    info = {"held_out_shape_accuracy": round(shape_acc, 4), "held_out_colour_accuracy": round(colour_acc, 4),
            "held_out_images": len(held), "train_images": len(train), "steps": args.steps,
            "seconds": round(time.time() - t0, 1), "command": "python -m miniworld.train_evaluator --out " + args.out}
    (out / "evaluator.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
