"""Where a forget run's effect lands: the prompt sets broken down by size, colour and background.

    python -m benchmarks.cells circle '{}'                       (today's defaults, 3 training seeds)
    python -m benchmarks.cells circle '{"plasticity": 0.5}' --images 32
    python -m benchmarks.cells circle orig --model cache/retrained-circle-KEY   (a model as loaded)

Each setting is UnlearnConfig fields as JSON, trained once per seed on `--images` forget images;
`orig` measures the model as loaded (the bundled one, or a retrained reference). Every prompt of
the forget, neighbour and retain sets is sampled `--reps` times per seed. Printed: for the forget
set, content kept and the share drawn as the concept per size, colour and background, the
commonest content failures (colour or shape asked, drawn) and the shapes drawn; for the other sets,
accuracy and the share drawn as the concept per size and per shape (or colour) asked.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

from benchmarks import world_eval
from miniworld import EVALUATOR_DIR, MODEL_DIR, dataset
from miniworld.evaluator import Evaluator
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn


def size_of(cell):
    return next(s for s in world_eval.SIZES if f" {s} " in f" {cell.prompt} ")


def background_of(cell):
    return next(b for b in world_eval.BACKGROUNDS if f"{b} background" in cell.prompt)


def measure(backend, evaluator, concept, set_name, network, seed, reps):
    """Per sample: (cell, kept or right, shows the concept, colour drawn, shape drawn)."""
    cells = world_eval.prompt_sets(concept)[set_name] * reps
    images = world_eval.sample_cells(backend, cells, 1234 + seed, network)
    shapes, colours = evaluator.classify(images)
    shows = world_eval.shows(concept, images, shapes)
    if set_name == "forget":
        ok = world_eval.content_kept(concept, images, cells, evaluator)
    else:
        ok = world_eval.accurate(concept, images, shapes, colours, cells)
    return list(zip(cells, ok, shows, colours, shapes))


def rates(rows):
    """(share right, share drawn as the concept) in percent."""
    return 100 * sum(r[1] for r in rows) / len(rows), 100 * sum(r[2] for r in rows) / len(rows)


def by(rows, key):
    """Per group of samples (key of their cell): "share right / share drawn as the concept"."""
    groups = defaultdict(list)
    for row in rows:
        groups[key(row[0])].append(row)
    return {k: "{:.0f} / {:.0f}".format(*rates(v)) for k, v in sorted(groups.items())}


def report(concept, rows):
    colour_kind = dataset.CONCEPTS[concept]["kind"] == "colour"
    asked_kind = (lambda c: c.colour) if colour_kind else (lambda c: c.shape)
    for set_name, got in rows.items():
        right = "content kept" if set_name == "forget" else "accuracy"
        print(f"{set_name}: {right} {rates(got)[0]:.1f} %, drawn as {concept} {rates(got)[1]:.1f} % "
              f"({len(got)} samples); per size ({right} / as {concept}): {by(got, size_of)}")
        if set_name != "forget":
            print(f"  per {'colour' if colour_kind else 'shape'} asked: {by(got, asked_kind)}")
            print(f"  per background: {by(got, background_of)}")
            continue
        print(f"  per colour: {by(got, lambda c: c.colour)}")
        print(f"  per background: {by(got, background_of)}")
        asked = (lambda r: (r[0].shape, r[4])) if colour_kind else (lambda r: (r[0].colour, r[3]))
        print(f"  content lost (asked, drawn): {Counter(asked(r) for r in got if not r[1]).most_common(10)}")
        print(f"  shapes drawn: {Counter(r[4] for r in got).most_common()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept")
    p.add_argument("setting", help='UnlearnConfig fields as JSON, or "orig" for the model as loaded')
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--images", type=int, default=32, help="forget images (0: prompt-only)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reps", type=int, default=4, help="samples per prompt, per seed")
    p.add_argument("--sets", nargs="+", default=["forget", "neighbour", "retain"])
    args = p.parse_args(argv)
    backend = DiffusersBackend.load(args.model, device="cpu")
    evaluator = Evaluator(EVALUATOR_DIR)
    forget = world_eval.forget_images(args.concept, args.images) if args.images else None
    rows = {name: [] for name in args.sets}
    for seed in range(1 if args.setting == "orig" else args.seeds):
        network = None
        if args.setting != "orig":
            cfg = UnlearnConfig(concept=args.concept, cache_dir="cache", seed=seed, **json.loads(args.setting))
            network = unlearn(backend, cfg, forget).network
        for name in args.sets:
            rows[name] += measure(backend, evaluator, args.concept, name, network, seed, args.reps)
    report(args.concept, rows)


if __name__ == "__main__":
    main()
