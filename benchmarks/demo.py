"""`make demo`: forget "red" from the bundled mini model with VDU, from 16 images of it, every
setting at its default: nothing named to keep (the run finds red's synonyms and neighbours itself).

Writes the LoRA and a before/after grid, and prints forget rate and retain accuracy before and
after (measured by the world's evaluator on samples with fixed seeds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import world_eval
from miniworld import EVALUATOR_DIR, MODEL_DIR
from miniworld.evaluator import Evaluator
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn
from vdu_engine.grid import to_pil_grid

CONCEPT = "red"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--samples", type=int, default=128, help="samples per prompt set for the numbers")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps, the UNet's or the text encoder's (default: the engine's; fewer: a smoke test)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = DiffusersBackend.load(MODEL_DIR, device="cpu")
    evaluator = Evaluator(EVALUATOR_DIR)
    forget = world_eval.forget_images(CONCEPT, 16)
    print(f"forgetting {CONCEPT!r} from {MODEL_DIR.name} with VDU, from {len(forget)} images of it")

    t0 = time.time()
    steps = {"steps": args.steps, "text_steps": args.steps} if args.steps else {}
    result = unlearn(backend, UnlearnConfig(concept=CONCEPT, cache_dir=str(out / "cache"), **steps), forget,
                     progress=lambda s, n, terms: print(f"\r  step {s}/{n}  loss {terms['loss']:.4g}", end="",
                                                        flush=True))
    print(f"\n  trained {result.metadata['vdu_steps']} steps in {time.time() - t0:.0f} s")
    print("  " + result.summary().replace("; ", "\n  "))  # where red goes, its synonyms, the neighbours held
    lora = result.save(out / f"forget-{CONCEPT}.safetensors", overwrite=True)
    print(f"  wrote {lora}")

    before = world_eval.evaluate(backend, evaluator, CONCEPT, args.samples)
    after = world_eval.evaluate(backend, evaluator, CONCEPT, args.samples, network=result.network)
    print(f"\n{'':22}{'before':>10}{'after':>10}")
    for key, label in (("forget_rate", "forget rate (red)"), ("synonym_forget_rate", "forget rate (crimson…)"),
                       ("content_kept", "red prompts: shape kept"),
                       ("neighbour_acc", "orange accuracy"), ("neighbour_shows_concept", "orange drawn red"),
                       ("retain_acc", "retain accuracy")):
        print(f"{label:22}{before['metrics'][key]:>10.1%}{after['metrics'][key]:>10.1%}")

    cols = 8
    spread = lambda imgs: imgs[::max(1, len(imgs) // cols)][:cols]  # across shapes and colours, not the first prompts
    rows = [spread(ev["images"][s]) for s in ("forget", "retain") for ev in (before, after)]
    grid = to_pil_grid(rows, ["red: before", "red: after", "others: before", "others: after"],
                       [f"sample {i * max(1, args.samples // cols) + 1}" for i in range(cols)])
    grid.save(out / "before_after.png")
    print(f"\nwrote {out / 'before_after.png'}")


if __name__ == "__main__":
    main()
