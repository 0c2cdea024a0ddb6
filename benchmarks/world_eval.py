"""Measuring unlearning in the mini world: prompt sets, sampling, and the metrics.

For a concept (a colour, a shape or a background) the prompts fall in four sets: `forget` (naming it),
`synonym` (naming it with another word the model learned), `neighbour` (the nearest other
concept), and `retain` (everything else). A sample shows the concept when the evaluator sees it
(colour and background analytically, shape by the classifier); it is correct when its shape and
colour are what its prompt asks for, and for a background concept its background too. An erasure
that draws nothing also stops a concept from showing, so the forget sets also measure whether the
rest of the prompt is still drawn (`content_kept`), and every set how many images are blank or
noise (`is_blank`, `is_noise`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from miniworld import dataset
from miniworld.evaluator import (MIN_REGION, Evaluator, classify_background, classify_colour, colour_area,
                                  frechet_distance)
from vdu_engine.sampling import ddim_sample

# DDIM 10 measures the same as 20 within sampling noise (`python -m benchmarks.world_eval` with and
# without --steps 20: colour 97.9 vs 99.0 %, shape 50.0 vs 49.0 %) in half the time; measured on
# the mini model before its 2026-11-27 retraining.
GUIDANCE, STEPS = 5.0, 10
SIZES, BACKGROUNDS = list(dataset.SIZES), list(dataset.BACKGROUNDS)


@dataclass
class Cell:
    prompt: str
    shape: str
    colour: str
    background: str = ""


def _cells(shapes, colours, words=None, backgrounds=BACKGROUNDS) -> List[Cell]:
    """Prompt cells for every shape × colour × size × background; `words` renames the concept's
    word in the prompt (synonyms) while keeping the true label."""
    words = words or {}
    out = []
    for s, c, z, b in itertools.product(shapes, colours, SIZES, backgrounds):
        out.append(Cell(dataset.prompt(words.get(s, s), words.get(c, c), z, words.get(b, b)), s, c, b))
    return out


def _kind(concept: str) -> str:
    return dataset.CONCEPTS[concept]["kind"]


def prompt_sets(concept: str) -> Dict[str, List[Cell]]:
    info = dataset.CONCEPTS[concept]
    colours, shapes = list(dataset.COLOURS), list(dataset.SHAPES)
    near = info["neighbours"]
    if info["kind"] == "background":
        others = [b for b in BACKGROUNDS if b != concept and b not in near]
        return {"forget": _cells(shapes, colours, backgrounds=[concept]),
                "synonym": [cell for w in info["synonyms"]
                            for cell in _cells(shapes, colours, {concept: w}, backgrounds=[concept])],
                "neighbour": _cells(shapes, colours, backgrounds=near),
                "retain": _cells(shapes, colours, backgrounds=others)}
    if info["kind"] == "colour":
        others = [c for c in colours if c != concept and c not in near]
        return {"forget": _cells(shapes, [concept]),
                "synonym": [cell for w in info["synonyms"] for cell in _cells(shapes, [concept], {concept: w})],
                "neighbour": _cells(shapes, near), "retain": _cells(shapes, others)}
    others = [s for s in shapes if s != concept and s not in near]
    return {"forget": _cells([concept], colours),
            "synonym": [cell for w in info["synonyms"] for cell in _cells([concept], colours, {concept: w})],
            "neighbour": _cells(near, colours), "retain": _cells(others, colours)}


def expand(cells: List[Cell], n: int) -> List[Cell]:
    """n cells: whole passes through the set, then the remainder spread evenly over it (not its
    first cells, which would over-weight the first shape), so every prompt is sampled equally ±1."""
    full, rem = divmod(n, len(cells))
    return cells * full + [cells[i * len(cells) // rem] for i in range(rem)]


def sample_cells(backend, cells: List[Cell], seed: int, network=None, steps: Optional[int] = None) -> torch.Tensor:
    prompts = [c.prompt for c in cells]
    # cache-sized batches: faster than 256 on this CPU, and the same images (each has its own seed)
    kw = dict(steps=steps or STEPS, guidance=GUIDANCE, batch_size=64)
    if network is None:
        return ddim_sample(backend, prompts, seed, **kw).cpu()  # measured on the CPU, where the evaluator is
    with network.attached():
        network.eval()
        return ddim_sample(backend, prompts, seed, **kw).cpu()


def shows(concept: str, images: torch.Tensor, shapes: List[str]) -> List[bool]:
    """A colour shows if it covers a region of the image (not only if it is the mean hue: a
    noisy image with a red patch still shows red); a shape if the classifier sees it; a background
    if the image's background is that grey."""
    if _kind(concept) == "colour":
        return [a >= MIN_REGION for a in colour_area(images, concept)]
    if _kind(concept) == "background":
        return [b == concept for b in classify_background(images)]
    return [s == concept for s in shapes]


# A pixel stands out when a channel is this far from the image's median colour: 10x the texture's
# sigma (0.015; over 900 shapeless backgrounds none passes 0.08), well under the faintest shape
# (purple on grey, ~0.38 in a channel). With fewer than MIN_REGION such pixels an image is blank:
# over 4000 dataset images at least 33 stand out (over 96 of the mini model's, 57), on a shapeless
# background none.
STANDOUT = 0.15
# Mean absolute difference between neighbouring pixels above which an image is noise: the
# geometric middle of the dataset's largest (0.042 over 4000 images, edges and texture) and
# uniform noise's smallest (0.32), about what Gaussian noise of sigma 0.1 over grey gives (0.11).
# The mini model's own images reach 0.047.
NOISE_STEP = 0.12


def is_blank(images: torch.Tensor) -> List[bool]:
    """Whether each image [N, 3, H, W] in [0, 1] has no shape to speak of: fewer than MIN_REGION
    pixels stand out from its median colour. A grey or dark shape on another background stands
    out (it is only `classify_colour`'s "none"); a frame filled with one colour is blank; noise
    is not blank, see is_noise."""
    px = images.detach().flatten(2)
    off = (px - px.median(-1, keepdim=True).values).abs().amax(1)
    return ((off > STANDOUT).sum(-1) < MIN_REGION).tolist()


def is_noise(images: torch.Tensor) -> List[bool]:
    """Whether each image is dominated by pixel-to-pixel variation (noise, not a drawn shape)."""
    x = images.detach()
    step = ((x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3)) +
            (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))) / 2
    return (step > NOISE_STEP).tolist()


def content_kept(concept: str, images: torch.Tensor, cells: List[Cell], evaluator: Evaluator) -> List[bool]:
    """Whether each image still draws what its prompt asks for besides the concept: forgetting a
    colour should keep the shape, forgetting a shape the colour. A blank or noise image keeps
    nothing (the shape classifier names a shape for any image, blank or not). The classifier
    learned saturated shapes only and does not recognise grey ones: a colour erased to grey
    counts as content lost. Forgetting a background should keep both the shape and the colour."""
    if _kind(concept) == "colour":
        kept = [s == c.shape for s, c in zip(evaluator.classify_shape(images), cells)]
    elif _kind(concept) == "background":
        kept = correct(*evaluator.classify(images), cells)
    else:
        kept = [col == c.colour for col, c in zip(classify_colour(images), cells)]
    return [k and not b and not z for k, b, z in zip(kept, is_blank(images), is_noise(images))]


def correct(shapes: List[str], colours: List[str], cells: List[Cell]) -> List[bool]:
    """Whether each sample's shape and colour are both what its prompt asks for."""
    return [s == c.shape and col == c.colour for s, col, c in zip(shapes, colours, cells)]


def accurate(concept: str, images: torch.Tensor, shapes: List[str], colours: List[str],
             cells: List[Cell]) -> List[bool]:
    """A neighbour's or retained prompt's sample is right when its shape and colour are; for a
    background concept its background must be right too, since that is where the concept moves."""
    right = correct(shapes, colours, cells)
    if _kind(concept) != "background":
        return right
    return [r and b == c.background for r, b, c in zip(right, classify_background(images), cells)]


def _sample_split(backend, cells: List[Cell], seed: int, networks) -> tuple:
    """Each network draws a 1/len(networks) share of the cells, picked by a fixed shuffle: a plain
    stride would give each network only the prompts at its offset (with sets whose size is a
    multiple of 3, one background per network), mixing seed and prompt effects. The cells come
    back reordered network by network, with their images."""
    k = len(networks)
    order = torch.randperm(len(cells), generator=torch.Generator().manual_seed(seed)).tolist() if k > 1 \
        else list(range(len(cells)))
    parts = [([cells[i] for i in order[j::k]], net) for j, net in enumerate(networks)]
    imgs = torch.cat([sample_cells(backend, part, seed + j, net) for j, (part, net) in enumerate(parts) if part])
    return [c for part, _ in parts for c in part], imgs


def evaluate(backend, evaluator: Evaluator, concept: str, n: int, seed: int = 1234, network=None,
             real_retain: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """The metrics of one model, optionally with a LoRA network attached. `network` may be a
    list (the runs of one setting with different training seeds): the n samples of each set are
    split evenly among them, so the metrics average over training runs at the cost of one.
    Keys: `forget_rate`, `content_kept` and their `synonym_` twins; `neighbour_acc`,
    `retain_acc`, and the share of those sets' samples that show the concept (`neighbour_shows_concept`,
    `retain_shows_concept`); per set the share of blank and of noise images (`blank_share`, `noise_share`
    for the forget set, `synonym_`, `neighbour_` and `retain_` for the others); `ufid`."""
    networks = network if isinstance(network, (list, tuple)) else [network]
    sets = prompt_sets(concept)
    result, images = {}, {}
    for name in ("forget", "synonym", "neighbour", "retain"):
        if not sets[name]:  # a concept with no synonym in the world
            continue
        cells, imgs = _sample_split(backend, expand(sets[name], n), seed, networks)
        images[name] = imgs
        shapes, colours = evaluator.classify(imgs)
        prefix = "" if name == "forget" else f"{name}_"
        if name in ("forget", "synonym"):
            result[f"{prefix}forget_rate"] = sum(shows(concept, imgs, shapes)) / n
            result[f"{prefix}content_kept"] = sum(content_kept(concept, imgs, cells, evaluator)) / n
        else:
            result[f"{name}_acc"] = sum(accurate(concept, imgs, shapes, colours, cells)) / n
            # the concept drawn for prompts that do not name it: forgotten from its own prompts, moved to others'
            result[f"{name}_shows_concept"] = sum(shows(concept, imgs, shapes)) / n
        result[f"{prefix}blank_share"] = sum(is_blank(imgs)) / n
        result[f"{prefix}noise_share"] = sum(is_noise(imgs)) / n
    if real_retain is not None:
        result["ufid"] = frechet_distance(evaluator.features(images["retain"]), evaluator.features(real_retain))
    return {"metrics": result, "images": images}


_GENERATE_ARG = {"colour": "colours", "shape": "shapes", "background": "backgrounds"}  # dataset.generate's


def real_images(concept: str, n: int, seed: int = 99) -> torch.Tensor:
    """Real dataset images of the retained concepts (the concept and its neighbours left out)."""
    info = dataset.CONCEPTS[concept]
    key = _GENERATE_ARG[info["kind"]]
    pool = {"colours": dataset.COLOURS, "shapes": dataset.SHAPES, "backgrounds": dataset.BACKGROUNDS}[key]
    keep = [x for x in pool if x != concept and x not in info["neighbours"]]
    return dataset.to_tensor(dataset.generate(n, seed=seed, **{key: keep}))


def forget_images(concept: str, n: int, seed: int = 7):
    """n real images of the concept with their captions (which sometimes use a synonym)."""
    from vdu_engine import ForgetSet
    key = _GENERATE_ARG[_kind(concept)]
    samples = dataset.generate(n, seed=seed, **{key: [concept]})
    return ForgetSet.from_tensor(dataset.to_tensor(samples), [s.caption for s in samples], channels_last=False)


def prompt_following(backend, evaluator: Evaluator, n: int, seed: int = 4321,
                     steps: Optional[int] = None) -> Dict[str, float]:
    """How well a model does what its prompts say: over every shape × colour × size × background
    prompt (n samples cycling through them), the share whose colour, shape, and both are right;
    and per shape, the share drawn as that shape."""
    cells = expand(_cells(list(dataset.SHAPES), list(dataset.COLOURS)), n)
    shapes, colours = evaluator.classify(sample_cells(backend, cells, seed, steps=steps))
    out = {"colour_acc": sum(c == cell.colour for c, cell in zip(colours, cells)) / n,
           "shape_acc": sum(s == cell.shape for s, cell in zip(shapes, cells)) / n,
           "both_acc": sum(s == cell.shape and c == cell.colour for s, c, cell in zip(shapes, colours, cells)) / n}
    for shape in dataset.SHAPES:
        mine = [s for s, cell in zip(shapes, cells) if cell.shape == shape]
        out[f"shape_acc_{shape}"] = sum(s == shape for s in mine) / max(len(mine), 1)
    return out


@torch.no_grad()
def vae_roundtrip(backend, evaluator: Evaluator, n: int, seed: int = 555) -> Dict[str, float]:
    """Per shape, the share of real images the classifier still recognises after the model's
    VAE encodes and decodes them: what the latents can carry at all."""
    samples = dataset.generate(n, seed=seed)
    x = dataset.to_tensor(samples)
    shapes = evaluator.classify_shape(backend.decode_latents(backend.encode_images(x * 2 - 1)))
    return {s: sum(p == s for p, r in zip(shapes, samples) if r.shape == s) /
            max(sum(r.shape == s for r in samples), 1) for s in dataset.SHAPES}


def main(argv=None):
    """`python -m benchmarks.world_eval [--model DIR]`: the prompt-following numbers of a mini
    model, and how well shapes survive its VAE."""
    import argparse
    from miniworld import EVALUATOR_DIR, MODEL_DIR
    from vdu_engine import DiffusersBackend
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps (the benchmark's by default)")
    args = p.parse_args(argv)
    backend, evaluator = DiffusersBackend.load(args.model, device="cpu"), Evaluator(EVALUATOR_DIR)
    scores = prompt_following(backend, evaluator, args.samples, steps=args.steps)
    print(f"prompt following of {args.model} ({args.samples} samples, DDIM {args.steps}, guidance {GUIDANCE}):")
    for k, v in scores.items():
        print(f"  {k:18}{v:7.1%}")
    print("shapes recognised after a VAE round trip of 512 real images:")
    for k, v in vae_roundtrip(backend, evaluator, 512).items():
        print(f"  {k:18}{v:7.1%}")


if __name__ == "__main__":
    main()
