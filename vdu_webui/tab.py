"""The Unlearn tab: inputs as in the ComfyUI nodes, a Train button whose progress goes through the
WebUI's own job mechanism, Interrupt, a before/after preview and the loss curve.

`train` is the button's handler; it takes the inputs in the order of `INPUTS` and returns
(preview gallery, loss curve, message HTML). Every refusal — bad input, an interrupted run — is
a one-line message in the tab and nothing written. The gradio code runs on gradio 3 (A1111 1.10)
and 4 (Forge): only components and arguments both majors share, `_js` (Forge maps it to `js`).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from ..nodes.unlearn_nodes import keep_list, loss_curve, prompt_lines
from ..vdu_engine import OBJECTIVES, ForgetSet, UnlearnConfig, VDUError, unlearn
from ..vdu_engine.memory import MEMORY_PRESETS
from . import host

_D = UnlearnConfig()
INPUTS = ("folder", "concept", "anchor", "keep", "objective", "steps", "rank", "lr", "memory", "seed", "name",
          "overwrite", "retained", "resolution", "num_images", "sample_steps", "fisher_samples", "prior",
          "preview_steps", "forget_prompts", "text_destination", "text_steps")


class Interrupted(Exception):
    """Raised from the progress callback when Interrupt is pressed: the run stops, nothing is kept."""


def _message(text: str, ok: bool = False) -> str:
    colour = "var(--body-text-color)" if ok else "var(--error-text-color, #c00)"
    return f"<p style='color: {colour}'>{html.escape(text)}</p>"


def _forget_set(folder: str, concept: str):
    """The forget images, or None for prompt-only; VDUError when there is nothing to forget."""
    if folder.strip():
        path = Path(folder.strip()).expanduser()
        return ForgetSet.from_folder(path if path.is_absolute() else Path.cwd() / path)
    if not concept.strip():
        raise VDUError("nothing to forget: give a folder of images of the concept, or type the concept")
    return None


def _config(p: dict) -> UnlearnConfig:
    return UnlearnConfig(
        objective=p["objective"], concept=p["concept"].strip(), anchor=p["anchor"].strip(), keep=keep_list(p["keep"]),
        forget_prompts=prompt_lines(p["forget_prompts"]), steps=int(p["steps"]), rank=int(p["rank"]),
        alpha=float(int(p["rank"])), lr=float(p["lr"]), memory=p["memory"], seed=int(p["seed"]),
        resolution=int(p["resolution"]) or None, num_images=int(p["num_images"]), sample_steps=int(p["sample_steps"]),
        fisher_samples=int(p["fisher_samples"]), prior=p["prior"], text_destination=bool(p["text_destination"]),
        text_steps=int(p["text_steps"]),
    ).validate()


def _previews(backend, result, cfg, p) -> list:
    """Before/after images for the concept's prompt and a retained one (same seed), with the
    trained deltas attached beside the model, so the loaded model is not touched."""
    steps = int(p["preview_steps"])
    if steps <= 0:
        return []
    prompts = [cfg.concept or (result.metadata.get("vdu_concept") or ""), p["retained"].strip()]
    res = cfg.resolution or backend.resolution
    before = backend.generate(prompts, seed=cfg.seed, steps=steps, resolution=res)
    with result.network.attached():
        after = backend.generate(prompts, seed=cfg.seed, steps=steps, resolution=res)
    from PIL import Image
    pil = lambda x: Image.fromarray((x.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8"))
    return [(pil(before[0]), f"before: {prompts[0]}"), (pil(after[0]), f"after: {prompts[0]}"),
            (pil(before[1]), f"before: {prompts[1]}"), (pil(after[1]), f"after: {prompts[1]}")]


def run(p: dict):
    """One run from the tab's values (a dict keyed by INPUTS)."""
    t0 = time.perf_counter()
    target = host.lora_target(p["name"], bool(p["overwrite"]))
    forget = _forget_set(p["folder"], p["concept"])
    cfg = _config(p)
    backend = host.current_backend()
    job, history = host.Job(cfg.steps), []

    def progress(step, total, terms):
        if job.interrupted:
            raise Interrupted(step)
        history.append(terms)
        curve = loss_curve(history) if step % 10 == 0 or step == total else None
        job.step(step, total, f"step {step}/{total}, loss {terms['loss']:.4g}", curve)

    try:
        result = unlearn(backend, cfg, forget, progress=progress)
    except Interrupted as e:
        raise VDUError(f"interrupted at step {e.args[0]} of {cfg.steps}; nothing was written") from None
    if job.interrupted:  # pressed after the last step, before the file was written
        raise VDUError("interrupted; nothing was written")
    target.parent.mkdir(parents=True, exist_ok=True)  # a sub-folder of the LoRA folder, made only now
    result.save(target, overwrite=bool(p["overwrite"]))
    name = target.relative_to(host.lora_dir().resolve()).with_suffix("").as_posix()
    gallery = [] if job.interrupted else _previews(backend, result, cfg, p)
    done = (f"saved {target} in {time.perf_counter() - t0:.0f} s ({len(result.history)} steps); "
            f"refresh the Lora tab and use <lora:{name}:1>. {result.summary()}")
    return gallery, loss_curve(result.history), _message(done, ok=True)


def train(*args):
    """The Train button's handler: (id_task, *INPUTS) → (gallery, loss curve, message)."""
    p = dict(zip(INPUTS, args[1:]))
    try:
        return run(p)
    except VDUError as e:
        return [], None, _message(str(e))


def interrupt():
    host.shared().state.interrupt()


def build():
    """The tab's gradio Blocks, for script_callbacks.on_ui_tabs."""
    import gradio as gr
    from modules.call_queue import wrap_gradio_gpu_call
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                fields = _input_fields(gr)
                with gr.Row():
                    start = gr.Button("Train", variant="primary", elem_id="vdu_unlearn_train")
                    stop = gr.Button("Interrupt", elem_id="vdu_unlearn_interrupt")
            with gr.Column(elem_id="vdu_unlearn_results"):
                gallery = gr.Gallery(label="Before / after", columns=2, elem_id="vdu_unlearn_gallery")
                curve = gr.Image(label="Loss", type="pil", interactive=False)
                message = gr.HTML(elem_id="vdu_unlearn_message")
        id_task = gr.Textbox(visible=False)
        start.click(fn=wrap_gradio_gpu_call(train, extra_outputs=[[], None]), _js="vdu_unlearn_start",
                    inputs=[id_task, *[fields[k] for k in INPUTS]], outputs=[gallery, curve, message])
        stop.click(fn=interrupt, inputs=[], outputs=[])
    return tab


def _input_fields(gr) -> dict:
    f = {
        "folder": gr.Textbox(label="Image folder (empty: prompt only)", placeholder="path/to/images"),
        "concept": gr.Textbox(label="Concept", placeholder="a red circle"),
        "anchor": gr.Textbox(label="Anchor: what the concept's prompts draw instead (optional)",
                             placeholder="orange"),
        "keep": gr.Textbox(label="Keep (comma-separated)", placeholder="purple, yellow"),
    }
    with gr.Row():
        f["objective"] = gr.Dropdown(label="Objective", choices=list(OBJECTIVES), value=_D.objective)
        f["memory"] = gr.Dropdown(label="Memory", choices=list(MEMORY_PRESETS), value="fast")
    with gr.Row():
        f["steps"] = gr.Slider(label="Steps", minimum=1, maximum=2000, step=1, value=_D.steps)
        f["rank"] = gr.Slider(label="Rank", minimum=1, maximum=128, step=1, value=_D.rank)
    with gr.Row():
        f["lr"] = gr.Number(label="Learning rate", value=_D.lr)
        f["seed"] = gr.Number(label="Seed", value=0, precision=0)
    with gr.Row():
        f["name"] = gr.Textbox(label="LoRA name", value="unlearned/forget")
        f["overwrite"] = gr.Checkbox(label="Overwrite", value=False)
    with gr.Accordion("Advanced", open=False):
        f["retained"] = gr.Textbox(label="Retained prompt for the preview", value="a photo of a house")
        with gr.Row():
            f["resolution"] = gr.Number(label="Resolution (0: the model's)", value=0, precision=0)
            f["preview_steps"] = gr.Number(label="Preview steps (0: none)", value=20, precision=0)
        with gr.Row():
            f["num_images"] = gr.Number(label="Images generated (prompt only)", value=_D.num_images, precision=0)
            f["fisher_samples"] = gr.Number(label="Images the model draws itself (set-up)", value=_D.fisher_samples,
                                            precision=0)
        f["forget_prompts"] = gr.Textbox(label="Prompts naming the concept as you use it (prompt only, one per line)",
                                         placeholder="a red car on a street", lines=3)
        with gr.Row():
            f["sample_steps"] = gr.Number(label="Sampler steps", value=_D.sample_steps, precision=0)
            f["prior"] = gr.Dropdown(label="Prior", choices=["fisher", "isotropic"], value=_D.prior)
        with gr.Row():
            f["text_destination"] = gr.Checkbox(label="Teach the text encoder the concept's destination (SD 1.x; "
                                                      "one-word concepts)", value=_D.text_destination)
            f["text_steps"] = gr.Number(label="Text-encoder steps (at most)", value=_D.text_steps, precision=0)
    return f
