"""Our Unlearn node beside ComfyUI's own LoRA trainer (`TrainLoraNode`), in one ComfyUI, in one run.

    COMFYUI_PATH=.cache/comfyui .venv-comfy/bin/python -m benchmarks.speed --vs-trainlora --out out/speed

Both nodes get the same SD 1.5-shaped checkpoint (benchmarks/comfy_checkpoint.py, loaded by
ComfyUI's own loader), the same images (as latents for TrainLoraNode, as a forget set for ours),
rank, steps, resolution, batch and fp32 precision, no gradient checkpointing. Each runs in a child
process of its own, as ComfyUI runs a node: inside `torch.inference_mode()`. Measured per node:
seconds per step (median of the step-to-step intervals: ComfyUI's progress hook for ours, the loss
callback for TrainLoraNode) and peak memory (peak RSS on the CPU, `torch.cuda.max_memory_allocated`
on a GPU), both after the checkpoint is loaded, so the shared part is not counted twice.

Layers: TrainLoraNode adapts every weighted module of the UNet (and trains a bias delta for each);
ours adapts the `layers` preset. Rows: ours at its default preset and at `all`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(rank=4, steps=12, resolution=128, batch=4, n_images=8, lr=1e-4)
CONCEPT = "red"


def import_comfy():
    """ComfyUI and this pack, importable in-process (the pack as ComfyUI loads it: by its folder)."""
    import importlib
    import os
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        raise SystemExit("--vs-trainlora needs COMFYUI_PATH pointing at a ComfyUI checkout (tools/setup_comfy.sh)")
    for p in (root, str(ROOT.parent), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    return importlib.import_module(ROOT.name)


# --- in the child process -----------------------------------------------------------------
class _Peak:
    """Peak memory from now on: RSS high-water mark on the CPU, allocated GPU memory on a GPU."""

    def __init__(self):
        self.gpu = torch.cuda.is_available()
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def mb(self) -> float:
        if self.gpu:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _inputs(spec):
    """The checkpoint through ComfyUI's loader, and the images both nodes train on."""
    import comfy.sd
    from benchmarks import world_eval
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(spec["checkpoint"], output_vae=True,
                                                             output_clip=True)[:3]
    forget = world_eval.forget_images(CONCEPT, spec["n_images"])
    return model, clip, vae, forget


def _run_ours(pack, spec, model, clip, vae, forget):
    import comfy.utils
    from importlib import import_module
    nodes = import_module(f"{pack.__name__}.nodes.unlearn_nodes")
    stamps = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: stamps.append(
        time.perf_counter()))
    forget.crop = "center"
    source = {"forget": forget, "concept": CONCEPT, "anchor": "", "num_images": len(forget),
              "resolution": spec["resolution"], "keep": []}
    peak = _Peak()
    node = nodes.VDUUnlearn()
    defaults = nodes._DEFAULTS
    node.run(model, clip, vae, source, "vdu", spec["steps"], spec["rank"], spec["lr"], defaults.gamma,
             defaults.prior, defaults.prior_sigma, spec["layers"], 0, "fast",
             text_destination=False)  # the UNet's step, which TrainLoraNode's is compared with
    return stamps, peak.mb()


def _run_trainlora(spec, model, clip, vae, forget):
    import comfy_extras.nodes_train as nt
    import nodes as comfy_nodes
    stamps = []

    class TimedSampler(nt.TrainSampler):
        def __init__(self, *a, loss_callback=None, **kw):
            def timed(loss):
                stamps.append(time.perf_counter())
                if loss_callback:
                    loss_callback(loss)
            super().__init__(*a, loss_callback=timed, **kw)

    nt.TrainSampler = TimedSampler
    pixels = forget.pixels(spec["resolution"])
    images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI IMAGE: BHWC in [0, 1]
    latents = comfy_nodes.VAEEncode().encode(vae, images)[0]
    encode = comfy_nodes.CLIPTextEncode()
    positive = [encode.encode(clip, c)[0][0] for c in forget.captions_for(CONCEPT)]
    peak = _Peak()
    nt.TrainLoraNode().train(model, latents, positive, spec["batch"], spec["steps"], 1, spec["lr"], spec["rank"],
                             "AdamW", "MSE", 0, "fp32", "fp32", "LoRA", False, "[None]")
    return stamps, peak.mb()


def child(spec: dict) -> dict:
    pack = import_comfy()
    torch.manual_seed(0)
    with torch.inference_mode():  # as ComfyUI executes every node
        model, clip, vae, forget = _inputs(spec)
        if spec["node"] == "trainlora":
            stamps, peak = _run_trainlora(spec, model, clip, vae, forget)
        else:
            stamps, peak = _run_ours(pack, spec, model, clip, vae, forget)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_step": statistics.median(steps), "steps_timed": len(steps), "peak_mb": peak}


# --- in the parent --------------------------------------------------------------------------
def _in_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.comfy_side_by_side", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"side-by-side child {spec['node']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(settings: dict = SETTINGS) -> dict:
    """The rows, and the two headline ratios (ours at its default layers against TrainLoraNode)."""
    import_comfy()
    from benchmarks.comfy_checkpoint import write_checkpoint
    from vdu_engine.layers import DEFAULT_PRESET
    ckpt = Path(tempfile.mkdtemp(prefix="vdu-vs-trainlora-")) / "sd15_shaped.safetensors"
    write_checkpoint(ckpt)
    base = dict(settings, checkpoint=str(ckpt))
    rows = {"ComfyUI TrainLoraNode (every layer)": _in_child(dict(base, node="trainlora")),
            f"vdu-unlearn Unlearn node ({DEFAULT_PRESET}, the default)": _in_child(
                dict(base, node="vdu", layers=DEFAULT_PRESET)),
            "vdu-unlearn Unlearn node (all)": _in_child(dict(base, node="vdu", layers="all"))}
    theirs, ours = rows["ComfyUI TrainLoraNode (every layer)"], list(rows.values())[1]
    return {"settings": settings, "device": "cuda" if torch.cuda.is_available() else "cpu", "rows": rows,
            "comfy_vs_trainlora_step_ratio": ours["seconds_per_step"] / theirs["seconds_per_step"],
            "comfy_vs_trainlora_peak_memory_ratio": ours["peak_mb"] / theirs["peak_mb"]}


def markdown(report: dict) -> str:
    s = report["settings"]
    memory = "peak GPU memory allocated" if report["device"] == "cuda" else "peak RSS"
    lines = [f"## In ComfyUI, beside TrainLoraNode ({report['device']}; SD 1.5-shaped checkpoint, "
             f"{s['resolution']} px, batch {s['batch']}, rank {s['rank']}, {s['steps']} steps, fp32)", "",
             f"| node | s / step | {memory} above the loaded checkpoint (MB) |", "|---|---|---|"]
    lines += [f"| {name} | {r['seconds_per_step']:.3f} | {r['peak_mb']:.0f} |" for name, r in report["rows"].items()]
    lines += ["", f"Unlearn (default) / TrainLoraNode: step {report['comfy_vs_trainlora_step_ratio']:.2f} ×, "
              f"peak memory {report['comfy_vs_trainlora_peak_memory_ratio']:.2f} ×.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
