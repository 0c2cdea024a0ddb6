"""Writes the settings of the VDU-defaults sweep (one JSON object per line, prefixed by its concept).

"keep" settings give Fisher/replay prompts that name neighbours in the concept's place: the
captions of the forget images with the concept word swapped for each kept word, beside the
default prompts ("" and the captions with the word taken out). The sweep predates the engine's
`keep` option, which now builds such prompts itself; these explicit lists (in their own order,
which decides which prompts the Fisher images fall on) stay so that run.sh reproduces the
committed results.
"""
import json
import sys

from benchmarks import world_eval
from vdu_engine import UnlearnConfig
from vdu_engine.train import fisher_prompts


def keep(concept, words, n=32):
    captions = world_eval.forget_images(concept, n).captions
    base = fisher_prompts(UnlearnConfig(concept=concept), captions)
    named = sorted({c for c in captions if f" {concept} " in f" {c} "})
    return base + [c.replace(concept, w) for w in words for c in named]


COMMON = [{}, {"replay": 30}, {"replay": 100}, {"fisher_samples": 64}, {"fisher_samples": 64, "replay": 30},
          {"gamma": 0.7}, {"gamma": 0.3}, {"layers": "attention"}, {"bound": 1.2}, {"steps": 400}, {"lr": 2e-3},
          {"replay": 0}]
RED = COMMON + [{"replay": 300}, {"replay_batch": 8}, {"replay": 30, "replay_batch": 8}, {"layers": "attention_ff"},
                {"bound": 2.0}, {"lr": 5e-4}, {"rank": 1, "alpha": 1}, {"rank": 16, "alpha": 16}, {"t_min": 0.2},
                {"t_max": 0.6}, {"prior": "isotropic"}, {"train_text_encoder": True}, {"variational": True},
                {"fisher_prompts": keep("red", ["orange"]), "fisher_samples": 32},
                {"fisher_prompts": keep("red", ["orange"]), "fisher_samples": 32, "replay": 30},
                {"fisher_prompts": keep("red", ["orange", "yellow", "green", "blue", "purple"]), "fisher_samples": 64},
                {"fisher_prompts": keep("red", ["orange", "yellow", "green", "blue", "purple"]), "fisher_samples": 64,
                 "steps": 400, "lr": 2e-3}]
CIRCLE = COMMON + [{"fisher_prompts": keep("circle", ["ellipse"]), "fisher_samples": 32},
                   {"fisher_prompts": keep("circle", ["ellipse", "square", "triangle"]), "fisher_samples": 64},
                   {"fisher_prompts": keep("circle", ["ellipse", "square", "triangle"]), "fisher_samples": 64,
                    "steps": 400, "lr": 2e-3}]

# Second round: stronger plasticity (timesteps, bound, no early stop), alone and with kept neighbours.
K_RED, K_CIRCLE = {"fisher_prompts": keep("red", ["orange"]), "fisher_samples": 32}, \
    {"fisher_prompts": keep("circle", ["ellipse"]), "fisher_samples": 32}
STRONG = [{"t_max": 0.6}, {"bound": 2.0}, {"bound": 3.0}, {"t_max": 0.6, "bound": 2.0}, {"stop_when_bounded": 0},
          {"bound": 3.0, "stop_when_bounded": 0}, {"steps": 400, "stop_when_bounded": 0}]
ROUND2 = ([("red", {**K_RED, **s}) for s in STRONG] + [("circle", {**K_CIRCLE, **s}) for s in STRONG]
          + [("red", {**K_RED, "replay": 3}), ("red", {**K_RED, "fisher_samples": 64}),
             ("red", {**K_RED, "gamma": 0.3}), ("red", {**K_RED, "lr": 3e-3, "bound": 3.0, "stop_when_bounded": 0}),
             ("red", {"fisher_prompts": [""] + keep("red", ["orange"])[len(keep("red", [])):], "fisher_samples": 32}),
             ("red", {**K_RED, "t_max": 0.6, "bound": 3.0, "stop_when_bounded": 0})]
          + [("circle", s) for s in STRONG] + [("red", s) for s in STRONG[1:]]
          + [("red", {"t_max": 0.8}), ("red", {"t_max": 0.4}), ("red", {"t_max": 0.6, "replay": 30})])

if __name__ == "__main__":
    workers = int(sys.argv[1])
    jobs = [("red", s) for s in RED] + [("circle", s) for s in CIRCLE]
    if len(sys.argv) > 3 and sys.argv[3] == "2":
        jobs = ROUND2
    for w in range(workers):
        with open(f"{sys.argv[2]}/w{w}.txt", "w") as f:
            for concept, s in jobs[w::workers]:
                f.write(concept + "\t" + json.dumps(s) + "\n")
    print(len(jobs), "settings")
