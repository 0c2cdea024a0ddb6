"""`python -m benchmarks.step_ratio`: the headline of `benchmarks.speed` alone, in about 40 minutes on 2 CPU
cores: seconds per step of a default VDU run and of one with `--replay 0` against a plain peft LoRA step, on
the shallow SD 1.5-shaped model (256 px, batch 2, 2 alternating rounds of 4 steps), without the memory,
scaling and demo sections."""
import json
import tempfile

from benchmarks import speed, world_eval

if __name__ != "__main__":
    raise SystemExit("run as python -m benchmarks.step_ratio")

timed = {k: v for k, v in speed.OBJECTIVES.items() if k in ("vdu", "vdu (no replay)")}
result = speed.compare_objectives(speed.load_model("sd15_shallow"), world_eval.forget_images(speed.CONCEPT, 4),
                                  tempfile.mkdtemp(prefix="vdu-speed-"), 256, 2, 2, 4, objectives=timed)
print(json.dumps({k: result[k] for k in ("seconds_per_step", "ratio_to_lora", "steps_timed")}, indent=1))
