"""Side runs on the quality benchmark's measures: any engine settings, one concept.

    python -m benchmarks.sweep --concept red --images 32 --samples 128 '{"objective": "esd", "lr": 0.01}'

Each positional argument is a JSON object of UnlearnConfig fields; "base" evaluates the model
as loaded. `"images": N` in an object overrides --images (0 = prompt-only); `"seed": S` trains
seeds S .. S + --seeds − 1 (the samples are split among the runs). Prints one line of metrics
per setting, the numbers the README's side runs cite.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from benchmarks import world_eval
from miniworld import EVALUATOR_DIR, MODEL_DIR, ROOT
from miniworld.evaluator import Evaluator, classify_colour
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help='JSON objects of settings, or "base"')
    p.add_argument("--concept", default="red")
    p.add_argument("--images", type=int, default=32, help="forget images (0 = prompt-only)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seeds", type=int, default=1, help="training runs per setting, samples split among them")
    p.add_argument("--cache", default=str(ROOT / "cache"))
    p.add_argument("--colours", action="store_true",
                   help="also count the colours the evaluator sees in the neighbour prompts' samples")
    p.add_argument("--device", default="cpu",
                   help="where the model trains and samples (the evaluator stays on the CPU)")
    p.add_argument("--precision", default="fp32", help="the runs' --precision (fp32: the CPU's numbers on a GPU too)")
    args = p.parse_args(argv)
    backend, evaluator = DiffusersBackend.load(MODEL_DIR, device=args.device), Evaluator(EVALUATOR_DIR)
    real = world_eval.real_images(args.concept, args.samples)
    for run in args.runs:
        network, t0, steps = None, time.time(), 0
        if run != "base":
            settings = json.loads(run)
            n = settings.pop("images", args.images)
            first = settings.pop("seed", 0)
            forget = world_eval.forget_images(args.concept, n) if n else None
            network = []
            for seed in range(first, first + args.seeds):
                cfg = UnlearnConfig(**{"concept": args.concept, "cache_dir": args.cache, "seed": seed,
                                        "precision": args.precision, **settings})
                result = unlearn(backend, cfg, forget)
                network.append(result.network)
                steps += len(result.history) / args.seeds
        m = world_eval.evaluate(backend, evaluator, args.concept, args.samples, network=network, real_retain=real)
        colours = ""
        if args.colours:
            colours = f" neighbour_colours={dict(Counter(classify_colour(m['images']['neighbour'])))}"
        print(f"{run:50} " + " ".join(f"{k}={v:.3f}" for k, v in m["metrics"].items())
              + f" seconds={time.time() - t0:.0f} steps={steps:.0f}" + colours, flush=True)


if __name__ == "__main__":
    main()
