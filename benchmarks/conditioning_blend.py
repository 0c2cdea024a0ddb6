"""What the mini model draws for blends of the concept's conditioning with its alternatives'.

    python -m benchmarks.conditioning_blend [--concept red] [--samples 96]

A LoRA on the cross-attention keys and values is linear in the text embeddings, so on a prompt
between the captions it trained on it produces a blend of what it learned for them. This prints,
for the concept's forget prompts, the share of samples that keep the rest of what they ask for
(`world_eval.content_kept`) when the conditioning is the caption's own, its nearest neighbour's,
a blend of the two, or the mean over every alternative: the reason one neighbour, not one per
caption, is the destination (vdu_engine/destination.py).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from benchmarks import world_eval
from miniworld import EVALUATOR_DIR, MODEL_DIR, dataset
from miniworld.evaluator import Evaluator
from vdu_engine import DiffusersBackend


def blended_text(encode, weighted):
    """The conditioning Σ w_i · encode(p_i), one row per list of (weight, prompt) pairs."""
    rows = []
    for pairs in weighted:
        conds = [(w, encode([p])) for w, p in pairs]
        rows.append({k: sum(w * c[k] for w, c in conds) for k in conds[0][1]})
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    colours = [c for c, info in dataset.CONCEPTS.items() if info["kind"] == "colour"]
    p.add_argument("--concept", default="red", choices=colours)
    p.add_argument("--samples", type=int, default=96)
    args = p.parse_args(argv)
    backend, evaluator = DiffusersBackend.load(MODEL_DIR, device="cpu"), Evaluator(EVALUATOR_DIR)
    concept, near = args.concept, dataset.CONCEPTS[args.concept]["neighbours"][0]
    others = [c for c in dataset.COLOURS if c != concept]
    cells = world_eval.expand(world_eval.prompt_sets(concept)["forget"], args.samples)
    swap = lambda cell, w: cell.prompt.replace(concept, w)  # noqa: E731
    blends = {"the concept's own": lambda c: [(1.0, c.prompt)],
              f"{near} (its nearest neighbour)": lambda c: [(1.0, swap(c, near))],
              f"half {concept}, half {near}": lambda c: [(0.5, c.prompt), (0.5, swap(c, near))],
              f"mean of the {len(others)} other colours": lambda c: [(1 / len(others), swap(c, w)) for w in others]}
    encode, by_prompt = backend.encode_text, {c.prompt: c for c in cells}
    print(f"{'conditioning':32} content kept  colours drawn (of {args.samples})")
    for name, weights in blends.items():
        # a forget prompt's conditioning is replaced by the blend; the unconditional one stays
        backend.encode_text = lambda prompts: blended_text(
            encode, [weights(by_prompt[p]) if p in by_prompt else [(1.0, p)] for p in prompts])
        images = world_eval.sample_cells(backend, cells, 1234)
        backend.encode_text = encode
        kept = world_eval.content_kept(concept, images, cells, evaluator)
        colours = Counter(evaluator.classify(images)[1]).most_common(4)
        print(f"{name:32} {sum(kept) / len(kept):11.1%}  {', '.join(f'{c} {n}' for c, n in colours)}", flush=True)


if __name__ == "__main__":
    main()
