"""Quick trials behind docs/quality/tuning.md: one training seed per setting, n samples per set.

    python -m benchmarks.trial red,circle '{"orig": {}, "kv": {"layers": "cross_attention_kv"}}' 64

Each setting is a name and UnlearnConfig fields (plus "images": forget images, 0 = prompt-only;
default 32); the name "orig" measures the model as loaded.
"""
import sys, json, time, torch
from pathlib import Path
from miniworld import EVALUATOR_DIR, MODEL_DIR
from miniworld.evaluator import Evaluator
from benchmarks import world_eval
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn
if __name__ != "__main__":
    raise SystemExit("run as python -m benchmarks.trial")
concepts = sys.argv[1].split(",")
settings = json.loads(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
b = DiffusersBackend.load(MODEL_DIR, device="cpu"); ev = Evaluator(EVALUATOR_DIR)
for concept in concepts:
    if "orig" in settings:
        m = world_eval.evaluate(b, ev, concept, n)["metrics"]; print(concept, "original", {k: round(v, 3) for k, v in m.items()}, flush=True)
    for name, kw in settings.items():
        if name == "orig": continue
        kw = dict(kw); nimg = kw.pop("images", 32)
        fs = world_eval.forget_images(concept, nimg) if nimg else None
        t0 = time.time()
        r = unlearn(b, UnlearnConfig(concept=concept, cache_dir="cache", **kw), fs)
        tt = time.time() - t0
        m = world_eval.evaluate(b, ev, concept, n, network=r.network)["metrics"]
        print(concept, name, {k: round(v, 3) for k, v in m.items()}, f"train {tt:.0f}s steps {len(r.history)}",
              r.metadata.get("vdu_synonyms_found"), "|", r.metadata.get("vdu_neighbours_held"), "| steps", r.metadata["vdu_steps"], flush=True)
