"""`python -m benchmarks.speed --out DIR` (`make bench-speed`): how fast and how lean a run is.

In one run, on the mini model and on a shallow SD 1.5-shaped model built in code:
- seconds per step of each objective against a plain LoRA fine-tuning step (diffusers + peft, same
  model, layers, rank, batch and precision), measured in alternating rounds so that drift of the
  machine hits both alike; the VDU / LoRA ratio is the headline;
- peak memory of each memory option (one child process per option: peak RSS on the CPU);
- how step time and memory grow with forget images, rank, resolution and adapted layers (mini
  model, one child process per point), as a table and a PNG plot;
- the demo's unlearning run split into its phases (encode; prepare, which holds the prior, the forget rows'
  bounds and the destination; train; save).
With `--gpu-full` (an NVIDIA GPU) it also builds full-size SD 1.5 and SDXL UNets (random weights)
and reports seconds per step, peak GPU memory per memory preset, model FLOPs utilisation against
a measured bf16 matmul peak, and the projected time of a default run.
Writes DIR/speed.json (`vdu_vs_lora_step_ratio` at the top), DIR/speed.md and DIR/speed_scaling.png.
With `--vs-trainlora` (run in ComfyUI's venv, COMFYUI_PATH set) it measures only our Unlearn node
beside ComfyUI's TrainLoraNode (benchmarks/comfy_side_by_side.py) and merges that into DIR/speed.json,
with `comfy_vs_trainlora_step_ratio` and `comfy_vs_trainlora_peak_memory_ratio` at the top.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import sd_shapes, world_eval
from miniworld import MODEL_DIR
from vdu_engine import DiffusersBackend, UnlearnConfig, unlearn
from vdu_engine.layers import select_targets
from vdu_engine.memory import autocast_dtype

OBJECTIVES = {"vdu": {}, "vdu (no replay)": dict(replay=0.0), "vdu (replay batch 1)": dict(replay_batch=1),
              "vdu (isotropic prior)": dict(prior="isotropic"),
              "esd": dict(objective="esd"),
              "score_align": dict(objective="score_align", anchor="a blue circle"),
              "gradient_ascent": dict(objective="gradient_ascent")}
MEMORY_OPTIONS = {"fast (fp32)": dict(memory="fast"), "bf16": dict(precision="bf16"),
                  "gradient checkpointing": dict(gradient_checkpointing=True),
                  "micro-batch 1": dict(micro_batch_size=1), "low preset": dict(memory="low")}
SCALING = {"forget images": ("n_images", [8, 32, 128, 512]), "rank": ("rank", [1, 4, 16, 64]),
           "resolution": ("resolution", [32, 64, 128]),
           "layers": ("layers", ["cross_attention", "attention", "attention_ff", "all"])}
CONCEPT = "red"
# For the SD 1.5-shaped model on the CPU: a cheaper Fisher estimate (same precision tensors, so the
# same per-step cost); its setup phases are not what is timed there, and the full one takes minutes.
LIGHT_SETUP = dict(fisher_samples=4, sample_steps=5)


# --- models and runs ------------------------------------------------------------------------
def load_model(name: str, device="cpu") -> DiffusersBackend:
    if name == "mini":
        return DiffusersBackend.load(MODEL_DIR, device=device)
    return sd_shapes.build(name, device=device)


def run_config(cache: str, resolution: int, steps: int, batch: int, **kw) -> UnlearnConfig:
    """The run being timed: engine defaults, a fixed number of steps (no early stop), on the UNet: the step the
    baselines' steps compare with (the text encoder's form, where a run takes it, trains no UNet step at all)."""
    light = LIGHT_SETUP if resolution >= 128 else {}
    return UnlearnConfig(concept=CONCEPT, cache_dir=cache, steps=steps, batch_size=batch, resolution=resolution,
                         stop_when_bounded=0, **{"text_destination": False, **light, **kw})


def engine_steps(backend, cfg, forget):
    """Seconds of each step after the first (from the progress callback) and the run's timings."""
    stamps = []
    result = unlearn(backend, cfg, forget, progress=lambda s, n, terms: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])], result


def lora_steps(backend, cfg, forget):
    """The baseline: plain LoRA fine-tuning with peft on a copy of the same UNet, same layers,
    rank, batch, precision and sampling of images, timesteps and noise; MSE to the noise."""
    from peft import LoraConfig
    dev, res = backend.device, cfg.resolution or backend.resolution
    with torch.no_grad():
        x_all = backend.encode_images(forget.pixels(res).to(dev)).float()
        c_all = backend.encode_text(forget.captions_for(CONCEPT))
    unet = copy.deepcopy(backend.unet).requires_grad_(False)
    paths = [t.path for t in select_targets(backend.targets(), cfg.layers)]
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=paths, init_lora_weights=True))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    amp = autocast_dtype(cfg.precision, dev, backend.dtype)
    g, T, n = torch.Generator().manual_seed(cfg.seed), backend.schedule.num_train_timesteps, len(x_all)
    stamps = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        t = torch.randint(0, T, (cfg.batch_size,), generator=g).to(dev)
        x0 = x_all[idx].to(dev, backend.dtype)
        eps = torch.randn(x0.shape, generator=g).to(x0)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = unet(backend.schedule.add_noise(x0, eps, t), t,
                        encoder_hidden_states=c_all["context"][idx.to(dev)].to(backend.dtype)).sample
        loss = F.mse_loss(pred.float(), eps.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # one host sync per step, as the engine's loop has
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def compare_objectives(backend, forget, cache, resolution, batch, rounds, steps, objectives=OBJECTIVES):
    """Median seconds per step of the LoRA baseline and each objective, in alternating rounds."""
    times = {"lora (peft)": [], **{k: [] for k in objectives}}
    timings = {}
    for _ in range(rounds):
        times["lora (peft)"] += lora_steps(backend, run_config(cache, resolution, steps, batch), forget)
        for name, kw in objectives.items():
            dt, result = engine_steps(backend, run_config(cache, resolution, steps, batch, **kw), forget)
            times[name] += dt
            timings[name] = result.timings
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds_per_step": med, "ratio_to_lora": {k: v / med["lora (peft)"] for k, v in med.items()},
            "setup_seconds": timings, "steps_timed": len(times["vdu"]), "batch": batch, "resolution": resolution}


# --- one measurement in a child process (peak memory is per process) ---------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> float:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); returns the RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def child(spec: dict) -> dict:
    torch.manual_seed(0)
    backend = load_model(spec["model"])
    forget = world_eval.forget_images(CONCEPT, spec.get("n_images", spec["batch"]))
    kw = {k: spec[k] for k in ("rank", "layers") if k in spec} | spec.get("options", {})
    cfg = run_config(spec["cache"], spec["resolution"], spec["steps"], spec["batch"], **kw)
    before = reset_peak_rss()  # the peak of loading the model is not the run's
    if spec.get("baseline"):
        dt = lora_steps(backend, cfg, forget)
        encode = None
    else:
        dt, result = engine_steps(backend, cfg, forget)
        encode = result.timings["encode"]
    peak = _status_mb("VmHWM")
    return {"seconds_per_step": statistics.median(dt), "encode_seconds": encode,
            "peak_rss_mb": peak, "run_peak_above_model_mb": peak - before}


def in_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--child", json.dumps(spec)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_options(model, cache, resolution, batch, steps, quick=False):
    base = dict(model=model, cache=cache, resolution=resolution, batch=batch, steps=steps)
    rows = {"lora (peft), fp32": in_child(dict(base, baseline=True))}
    for name, options in list(MEMORY_OPTIONS.items())[-1:] if quick else MEMORY_OPTIONS.items():
        rows[f"vdu, {name}"] = in_child(dict(base, options=options))
    return rows


def scaling(cache, steps, quick):
    base = dict(model="mini", cache=cache, resolution=32, batch=4, steps=steps)
    out = {}
    for label, (key, values) in SCALING.items():
        values = values[:1] if quick else values
        out[label] = [{"value": v, **in_child(dict(base, **{key: v}))} for v in values]
    return out


def demo_split(cache):
    """The demo's run (16 images of red, VDU defaults, Fisher prior not cached) split by phase."""
    backend = load_model("mini")
    forget = world_eval.forget_images(CONCEPT, 16)
    t0 = time.perf_counter()
    result = unlearn(backend, UnlearnConfig(concept=CONCEPT, cache_dir=cache), forget)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.save(Path(cache) / "demo.safetensors", overwrite=True)
    split = dict(result.timings, save=time.perf_counter() - t0)
    return {"seconds": split, "total_seconds": total + split["save"], "steps": len(result.history)}


# --- full-size models on a GPU -----------------------------------------------------------
def matmul_peak_tflops(device, n=8192, reps=20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def step_flops(backend, resolution, batch) -> float:
    """FLOPs of one training step's forward and backward through the denoiser (counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, *backend.latent_shape(resolution), device=backend.device, requires_grad=True)
    t = torch.full((batch,), 500, device=backend.device)
    with torch.no_grad():
        c = backend.encode_text([CONCEPT] * batch)
    with FlopCounterMode(display=False) as counter, torch.autocast(backend.device.type, dtype=torch.bfloat16):
        backend.denoise(x, t, c).float().mean().backward()
    return float(counter.get_total_flops())


def gpu_full(kinds, device, steps, batch):
    dev = torch.device(device)
    peak = matmul_peak_tflops(dev, n=8192 if dev.type == "cuda" else 256, reps=20 if dev.type == "cuda" else 2)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "bf16_matmul_peak_tflops": peak, "models": {}}
    cache = tempfile.mkdtemp(prefix="vdu-speed-gpu-")
    for kind in kinds:
        backend = load_model(kind, device=device)
        res = backend.resolution if kind != "tiny" else 64
        forget = world_eval.forget_images(CONCEPT, 8)
        row = {"resolution": res, "batch": batch, "unet_params_m": sd_shapes.n_params(backend.unet) / 1e6,
               "presets": {}}
        for preset in ("fast", "balanced", "low"):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            cfg = run_config(cache, res, steps, batch, memory=preset)
            dt, result = engine_steps(backend, cfg, forget)
            row["presets"][preset] = {
                "seconds_per_step": statistics.median(dt),
                "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
                "setup_seconds": result.timings}
        lora = statistics.median(lora_steps(backend, run_config(cache, res, steps, batch), forget))
        fast = row["presets"]["fast"]
        flops = step_flops(backend, res, batch)
        row.update(lora_seconds_per_step=lora, vdu_vs_lora=fast["seconds_per_step"] / lora,
                   step_tflop=flops / 1e12, mfu=flops / fast["seconds_per_step"] / (peak * 1e12),
                   projected_default_run_seconds=sum(fast["setup_seconds"][k] for k in ("encode", "prepare"))
                   + UnlearnConfig().steps * fast["seconds_per_step"])
        out["models"][kind] = row
        del backend
    return out


# --- report --------------------------------------------------------------------------------
def write_plot(scale: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(scale), figsize=(4 * len(scale), 3.4))
    for ax, (label, rows) in zip(axes, scale.items()):
        xs = [str(r["value"]) for r in rows]
        ax.plot(xs, [r["seconds_per_step"] for r in rows], "o-", color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("s / step", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["run_peak_above_model_mb"] for r in rows], "s--", color="tab:red")
        ax2.set_ylabel("run peak RSS above model (MB)", color="tab:red")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("VDU on the mini model: step time and memory")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict) -> str:
    lines = [f"# Speed ({report['machine']})", "",
             f"**VDU step / plain peft LoRA step: {report['vdu_vs_lora_step_ratio']:.3f}** "
             f"(shallow SD 1.5-shaped model, batch {report['models']['sd15_shallow']['batch']}, "
             f"{report['models']['sd15_shallow']['resolution']} px)" if "sd15_shallow" in report["models"] else
             f"**VDU step / plain peft LoRA step: {report['vdu_vs_lora_step_ratio']:.3f}** (mini model)", ""]
    for name, m in report["models"].items():
        lines += [f"## Seconds per step: {name} (batch {m['batch']}, {m['resolution']} px, median of "
                  f"{m['steps_timed']} steps each)", "", "| method | s / step | ratio to LoRA |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {m['ratio_to_lora'][k]:.3f} |" for k, v in m["seconds_per_step"].items()]
        lines.append("")
    if report.get("memory"):
        lines += [f"## Memory options ({report['memory_model']}; peak RSS of one process per option)", "",
                  "| option | s / step | peak RSS (MB) | run peak above loaded model (MB) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds_per_step']:.3f} | {v['peak_rss_mb']:.0f} | {v['run_peak_above_model_mb']:.0f} |"
                  for k, v in report["memory"].items()]
        lines.append("")
    for label, rows in report.get("scaling", {}).items():
        lines += [f"## Scaling with {label} (mini model, batch 4)", "",
                  f"| {label} | s / step | encode (s) | peak RSS (MB) | run peak above model (MB) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['value']} | {r['seconds_per_step']:.4f} | {r['encode_seconds']:.3f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['run_peak_above_model_mb']:.0f} |" for r in rows]
        lines.append("")
    if report.get("demo"):
        d = report["demo"]
        lines += [f"## The demo's run ({d['steps']} steps, {d['total_seconds']:.1f} s)", "",
                  "| phase | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in d["seconds"].items()] + [""]
    if report.get("comfy_side_by_side"):
        from benchmarks import comfy_side_by_side
        lines.append(comfy_side_by_side.markdown(report["comfy_side_by_side"]))
    if report.get("gpu_full"):
        g = report["gpu_full"]
        lines += [f"## Full size on {g['device']} (bf16 matmul peak {g['bf16_matmul_peak_tflops']:.0f} TFLOP/s)", "",
                  "| model | px | preset | s / step | peak GPU memory (GB) |", "|---|---|---|---|---|"]
        for kind, m in g["models"].items():
            for p, v in m["presets"].items():
                peak = v["peak_gpu_memory_gb"]
                lines.append(f"| {kind} | {m['resolution']} | {p} | {v['seconds_per_step']:.3f} | "
                             f"{peak if peak is None else round(peak, 2)} |")
        lines += ["", "| model | LoRA s / step | VDU / LoRA | TFLOP / step | MFU | projected default run (s) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {m['lora_seconds_per_step']:.3f} | {m['vdu_vs_lora']:.3f} | {m['step_tflop']:.2f} | "
                  f"{m['mfu']:.1%} | {m['projected_default_run_seconds']:.0f} |" for k, m in g["models"].items()]
    return "\n".join(lines) + "\n"


RATIOS = ("comfy_vs_trainlora_step_ratio", "comfy_vs_trainlora_peak_memory_ratio")


def with_side_by_side(report: dict, side: dict) -> dict:
    """The report with the side-by-side's two ratios at its top and its rows at its end."""
    rest = {k: v for k, v in report.items() if k not in RATIOS and k != "comfy_side_by_side"}
    return {**{k: side[k] for k in RATIOS}, **rest, "comfy_side_by_side": side}


def keep_side_by_side(path: Path, report: dict) -> dict:
    """A new report keeps an earlier --vs-trainlora measurement in the same file (it needs another venv)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    return with_side_by_side(report, old["comfy_side_by_side"]) if "comfy_side_by_side" in old else report


def merge_side_by_side(out: Path, quick: bool = False) -> None:
    """The ComfyUI side-by-side, with its two ratios at the top of the existing report (if any)."""
    from benchmarks import comfy_side_by_side as sbs
    print("ComfyUI: Unlearn node beside TrainLoraNode", flush=True)
    side = sbs.side_by_side(dict(sbs.SETTINGS, steps=3, n_images=4, resolution=64) if quick else sbs.SETTINGS)
    path = out / "speed.json"
    report = with_side_by_side(json.loads(path.read_text()) if path.exists() else {}, side)
    path.write_text(json.dumps(report, indent=1))
    (out / "speed.md").write_text(markdown(report) if "models" in report else sbs.markdown(side))
    print(sbs.markdown(side))
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/speed")
    p.add_argument("--quick", action="store_true", help="mini model only, few steps (a smoke test, not numbers)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the step-time comparison")
    p.add_argument("--gpu-full", action="store_true", help="also full-size SD 1.5 and SDXL on --device")
    p.add_argument("--device", default="cuda", help="device of --gpu-full")
    p.add_argument("--gpu-kinds", nargs="+", default=["sd15", "sdxl"], help=argparse.SUPPRESS)
    p.add_argument("--vs-trainlora", action="store_true",
                   help="only our Unlearn node beside ComfyUI's TrainLoraNode, merged into DIR/speed.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.vs_trainlora:
        return merge_side_by_side(out, args.quick)
    cache = tempfile.mkdtemp(prefix="vdu-speed-")
    rounds, steps = (1, 3) if args.quick else (args.rounds, 4)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads", "models": {}}
    mini = load_model("mini")
    print("step times: mini model", flush=True)
    report["models"]["mini"] = compare_objectives(mini, world_eval.forget_images(CONCEPT, 32), cache, 32, 4,
                                                  rounds, steps + 4)
    headline = "mini"
    if not args.quick:
        print("step times: shallow SD 1.5-shaped model", flush=True)
        sd = load_model("sd15_shallow")
        report["models"]["sd15_shallow"] = compare_objectives(sd, world_eval.forget_images(CONCEPT, 4), cache, 256, 2,
                                                              min(rounds, 2), steps)
        headline = "sd15_shallow"
        del sd
    report = {"vdu_vs_lora_step_ratio": report["models"][headline]["ratio_to_lora"]["vdu"], **report}
    print("memory options", flush=True)
    report["memory_model"] = "mini, 32 px, batch 4" if args.quick else "sd15_shallow, 256 px, batch 2"
    report["memory"] = (memory_options("mini", cache, 32, 4, 3, quick=True) if args.quick
                        else memory_options("sd15_shallow", cache, 256, 2, 3))
    print("scaling", flush=True)
    report["scaling"] = scaling(cache, 4, args.quick)
    if not args.quick:
        print("demo run", flush=True)
        report["demo"] = demo_split(tempfile.mkdtemp(prefix="vdu-demo-"))
    if args.gpu_full:
        print(f"full-size models on {args.device}", flush=True)
        report["gpu_full"] = gpu_full(args.gpu_kinds, args.device, 3 if args.quick else 6, 1 if args.quick else 4)
    report = keep_side_by_side(out / "speed.json", report)
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    (out / "speed.md").write_text(markdown(report))
    write_plot(report["scaling"], out / "speed_scaling.png")
    print(markdown(report))
    print(f"wrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed_scaling.png'}")


if __name__ == "__main__":
    main()
