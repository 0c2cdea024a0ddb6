"""Quick trials behind docs/quality/tuning.md: one training seed per setting, n samples per set.

    python -m benchmarks.trial red,circle '{"orig": {}, "kv": {"layers": "cross_attention_kv"}}' 64 [MODEL_DIR]

Each setting is a name and UnlearnConfig fields (plus "images": forget images, 0 = prompt-only;
default 32); the name "orig" measures the model as loaded. MODEL_DIR (default: the bundled mini model) is
another mini model, e.g. one `python -m miniworld.train --seed 1` trained, to check a default on a model
the tuning never saw.
"""
import json
import sys
import time

from miniworld import EVALUATOR_DIR, MODEL_DIR
from miniworld.evaluator import Evaluator
from benchmarks import world_eval
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn

if __name__ != "__main__":
    raise SystemExit("run as python -m benchmarks.trial")


def rounded(metrics: dict) -> dict:
    return {k: round(v, 3) for k, v in metrics.items()}


concepts = sys.argv[1].split(",")
settings = json.loads(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
backend = DiffusersBackend.load(sys.argv[4] if len(sys.argv) > 4 else MODEL_DIR, device="cpu")
evaluator = Evaluator(EVALUATOR_DIR)
for concept in concepts:
    if "orig" in settings:
        metrics = world_eval.evaluate(backend, evaluator, concept, n)["metrics"]
        print(concept, "original", rounded(metrics), flush=True)
    for name, fields in settings.items():
        if name == "orig":
            continue
        fields = dict(fields)
        n_images = fields.pop("images", 32)
        forget = world_eval.forget_images(concept, n_images) if n_images else None
        t0 = time.time()
        result = unlearn(backend, UnlearnConfig(concept=concept, cache_dir="cache", **fields), forget)
        train_seconds = time.time() - t0
        metrics = world_eval.evaluate(backend, evaluator, concept, n, network=result.network)["metrics"]
        print(concept, name, rounded(metrics), f"train {train_seconds:.0f}s steps {len(result.history)}",
              result.metadata.get("vdu_synonyms_found"), "|", result.metadata.get("vdu_neighbours_held"),
              "| steps", result.metadata["vdu_steps"], flush=True)
