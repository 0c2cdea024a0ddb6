"""A procedural, captioned 32×32 world of coloured shapes on grey backgrounds.

Classes are shapes and features are colours, so both class and feature unlearning can be
measured. It has neighbours (red/orange, circle/ellipse) and synonyms the text encoder learns for
the same concept ("crimson", "scarlet" for red; "disc" for circle), so leaks through other words
show. Backgrounds are greys and shape colours fully saturated, which makes colour measurable
analytically (see evaluator.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

SIZE = 32
SHAPES = ["circle", "ellipse", "square", "triangle"]
COLOURS = {  # RGB in [0, 1]; hues spread so each is a class, red and orange the closest pair
    "red": (0.88, 0.08, 0.08), "orange": (0.95, 0.50, 0.05), "yellow": (0.92, 0.88, 0.08),
    "green": (0.10, 0.72, 0.18), "blue": (0.10, 0.25, 0.92), "purple": (0.58, 0.12, 0.80),
}
BACKGROUNDS = {"black": 0.08, "grey": 0.5, "white": 0.92}
SIZES = {"small": (5.0, 7.0), "large": (9.0, 12.0)}  # radius range in pixels
SYNONYMS = {"red": ["crimson", "scarlet"], "circle": ["disc"]}
# What the benchmark unlearns, and what sits next to it.
CONCEPTS = {
    "red": {"kind": "colour", "synonyms": SYNONYMS["red"], "neighbours": ["orange"]},
    "circle": {"kind": "shape", "synonyms": SYNONYMS["circle"], "neighbours": ["ellipse"]},
    # A third kind: a background is a property of the whole image, as an art style is. The world has no
    # synonym for one; its neighbour is the nearest grey.
    "white": {"kind": "background", "synonyms": [], "neighbours": ["grey"]},
}
SYNONYM_RATE = 0.25  # share of captions that use a synonym instead of the word itself


@dataclass
class Sample:
    image: np.ndarray  # [32, 32, 3] float32 in [0, 1]
    caption: str
    shape: str
    colour: str
    size: str
    background: str


def _mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Soft (anti-aliased) coverage of the shape on the pixel grid."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "circle":
        d = np.sqrt(u ** 2 + v ** 2) - r
    elif shape == "ellipse":
        d = (np.sqrt((u / 1.0) ** 2 + (v / 0.5) ** 2) - r) * 0.5
    elif shape == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - r * 0.85
    else:  # triangle pointing up (before rotation): three half-planes
        k = np.sqrt(3) / 2
        d = np.max(np.stack([v - r * 0.5, -k * u - 0.5 * v - r * 0.5, k * u - 0.5 * v - r * 0.5]), 0)
    return np.clip(0.5 - d, 0.0, 1.0)


def caption_for(shape: str, colour: str, size: str, background: str, rng: np.random.Generator) -> str:
    colour_word = rng.choice(SYNONYMS[colour]) if colour in SYNONYMS and rng.random() < SYNONYM_RATE else colour
    shape_word = rng.choice(SYNONYMS[shape]) if shape in SYNONYMS and rng.random() < SYNONYM_RATE else shape
    article = "an" if size[0] in "aeiou" else "a"
    return f"{article} {size} {colour_word} {shape_word} on a {background} background"


def render(shape: str, colour: str, size: str, background: str, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(*SIZES[size])
    margin = r * 0.9
    cx, cy = rng.uniform(margin, SIZE - margin, 2)
    angle = 0.0 if shape == "circle" else (
        rng.uniform(-0.5, 0.5) + (np.pi / 2 if shape == "ellipse" and rng.random() < 0.5 else 0))
    bg = BACKGROUNDS[background] + rng.uniform(-0.05, 0.05)
    img = np.full((SIZE, SIZE, 3), bg, np.float32)
    img += rng.normal(0, 0.015, (SIZE, SIZE, 1)).astype(np.float32)  # grey texture, no hue
    col = np.clip(np.array(COLOURS[colour]) + rng.uniform(-0.04, 0.04, 3), 0, 1).astype(np.float32)
    m = _mask(shape, cx, cy, r, angle)[..., None]
    return np.clip(img * (1 - m) + col * m, 0, 1).astype(np.float32)


def generate(n: int, seed: int = 0, exclude: Optional[Dict[str, str]] = None,
             shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS),
             backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> List[Sample]:
    """n samples, reproducible from the seed. `exclude={"colour": "red"}` (or "shape", "background")
    leaves a concept out entirely — for the model retrained without it."""
    rng = np.random.default_rng(seed)
    exclude = exclude or {}
    shapes = [s for s in shapes if exclude.get("shape") != s]
    colours = [c for c in colours if exclude.get("colour") != c]
    backgrounds = [b for b in backgrounds if exclude.get("background") != b]
    out = []
    for _ in range(n):
        shape, colour = rng.choice(shapes), rng.choice(colours)
        size, bg = rng.choice(list(SIZES)), rng.choice(list(backgrounds))
        out.append(Sample(render(shape, colour, size, bg, rng), caption_for(shape, colour, size, bg, rng),
                          str(shape), str(colour), str(size), str(bg)))
    return out


def vocabulary() -> List[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES}
    for syn in SYNONYMS.values():
        words.update(syn)
    return sorted(words)


def prompt(shape: str, colour: str, size: str = "large", background: str = "grey") -> str:
    article = "an" if size[0] in "aeiou" else "a"
    return f"{article} {size} {colour} {shape} on a {background} background"


def to_tensor(samples: List[Sample]):
    import torch
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
