"""Judging generated images: colour analytically, shape with a small CNN trained on the world.

Colour: the backgrounds are greys and the shapes saturated, so the shape's pixels are the
saturated ones and their mean hue names the colour (or "none" if too few are saturated).
Background: the shape covers under half the image, so the median pixel is background, and its
brightness names the grey.
Shape: a CNN trained by `python -m miniworld.train_evaluator` on generated images; its
penultimate layer is the feature space of the Fréchet distance (u-FID).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import torch
from torch import nn

from .dataset import BACKGROUNDS, COLOURS, SHAPES

MIN_PIXELS = 6  # fewer saturated pixels than this: no coloured shape to speak of
MIN_REGION = 20  # pixels of a colour that count as showing it (the smallest shape covers ~75)


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in [0, 1) of [..., 3] RGB."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h / 6


_COLOUR_HUES = {name: float(_hue(torch.tensor(rgb))) for name, rgb in COLOURS.items()}


def _saturated(img: torch.Tensor) -> torch.Tensor:
    """Pixels [P, 3] of one image [P, 3] that carry a colour (grey backgrounds do not)."""
    mx, mn = img.max(-1).values, img.min(-1).values
    sat = (mx - mn) / mx.clamp_min(1e-6)
    return img[(sat > 0.45) & (mx > 0.25)]


def _nearest_colour(hue: float) -> str:
    dist = {c: min(abs(hue - v), 1 - abs(hue - v)) for c, v in _COLOUR_HUES.items()}
    return min(dist, key=dist.get)


def colour_area(images: torch.Tensor, colour: str) -> List[int]:
    """How many pixels of each image have `colour` as their nearest hue: a concept "shows" when
    it covers a region, even in a noisy image whose mean hue is something else."""
    out = []
    for img in images.detach().permute(0, 2, 3, 1).reshape(len(images), -1, 3):
        hues = _hue(_saturated(img))
        out.append(sum(_nearest_colour(float(h)) == colour for h in hues))
    return out


def classify_colour(images: torch.Tensor) -> List[str]:
    """images [N, 3, H, W] in [0, 1] → the colour name of each shape, or "none"."""
    out = []
    for img in images.detach().permute(0, 2, 3, 1).reshape(len(images), -1, 3):
        px = _saturated(img)
        if len(px) < MIN_PIXELS:
            out.append("none")
            continue
        angle = _hue(px) * 2 * np.pi  # circular mean: red sits at both ends of the hue circle
        h = (torch.atan2(angle.sin().mean(), angle.cos().mean()) / (2 * np.pi)) % 1.0
        out.append(_nearest_colour(float(h)))
    return out


def classify_background(images: torch.Tensor) -> List[str]:
    """images [N, 3, H, W] in [0, 1] → the background of each: the grey nearest to the median pixel's
    brightness (the largest shape covers about 45 % of the image, so the median pixel is background)."""
    level = images.detach().mean(1).flatten(1).median(-1).values
    names, greys = list(BACKGROUNDS), torch.tensor(list(BACKGROUNDS.values()))
    return [names[i] for i in (level[:, None] - greys).abs().argmin(1).tolist()]


class ShapeNet(nn.Module):
    def __init__(self, n_classes: int = len(SHAPES)):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.Flatten(),
                                  nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


class Evaluator:
    def __init__(self, folder):
        folder = Path(folder)
        self.net = ShapeNet()
        from safetensors.torch import load_file
        self.net.load_state_dict(load_file(str(folder / "shape_net.safetensors")))
        self.net.eval()
        self.info = json.loads((folder / "evaluator.json").read_text())

    @staticmethod
    def _norm(images):
        return images * 2 - 1

    @torch.no_grad()
    def classify_shape(self, images: torch.Tensor) -> List[str]:
        logits = torch.cat([self.net(self._norm(images[i:i + 256])) for i in range(0, len(images), 256)])
        return [SHAPES[i] for i in logits.argmax(1)]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.body(self._norm(images[i:i + 256])) for i in range(0, len(images), 256)])

    def classify(self, images: torch.Tensor):
        """(shapes, colours) of a batch [N, 3, 32, 32] in [0, 1]."""
        return self.classify_shape(images), classify_colour(images)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), the matrix root through eigenvalues of
    Σa^½ Σb Σa^½ (symmetric, so torch.linalg.eigh is exact and stable)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * mid)
