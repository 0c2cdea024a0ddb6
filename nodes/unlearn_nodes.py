"""The ComfyUI nodes: thin wrappers that turn MODEL / CLIP / VAE / IMAGE into engine calls.

Custom socket types: VDU_FORGET (what to forget: images or a prompt) and VDU_LORA (a trained
kohya state dict with its metadata). Anything checkable before a run is checked in
VALIDATE_INPUTS, so ComfyUI shows a plain message on the node instead of a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..vdu_engine import OBJECTIVES, PRESETS, PRIORS, ForgetSet, UnlearnConfig, VDUError, unlearn
from ..vdu_engine.layers import DEFAULT_PRESET
from ..vdu_engine.memory import MEMORY_PRESETS
from ..vdu_engine.neighbours import word_pattern

CATEGORY = "unlearning"
FORGET, LORA = "VDU_FORGET", "VDU_LORA"
_DEFAULTS = UnlearnConfig()


PACK_ROOT = Path(__file__).resolve().parents[1]


def resolve_folder(folder: str) -> Path:
    """An absolute path as is; a relative one under ComfyUI's input folder, else under this pack
    (so the shipped example workflow finds `examples/red_shapes`)."""
    path = Path(folder.strip()).expanduser()
    if path.is_absolute():
        return path
    import folder_paths
    in_input = Path(folder_paths.get_input_directory()) / path
    return in_input if in_input.exists() or not (PACK_ROOT / path).exists() else PACK_ROOT / path


def _folder_problem(folder: str):
    try:
        ForgetSet.from_folder(resolve_folder(folder))
    except VDUError as e:
        return str(e)
    return None


class _ForgetSource:
    """What both forget-set nodes share: one VDU_FORGET output made by `build`."""
    RETURN_TYPES = (FORGET,)
    FUNCTION = "build"
    CATEGORY = CATEGORY


KEEP_TOOLTIP = ("Concepts to keep, comma-separated: what forgetting must not drag along, usually the concept's "
                "nearest neighbours (forgetting 'red': 'orange'). Empty = none.")


def keep_list(text: str):
    return [w.strip() for w in text.split(",") if w.strip()]


def prompt_lines(text: str):
    """One prompt per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class VDUForgetImages(_ForgetSource):
    DESCRIPTION = ("Images of the concept to forget: a folder (png/jpg/webp, optional .txt captions) "
                   "or an IMAGE batch.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "folder": ("STRING", {"default": "", "tooltip": (
                        "Folder of images of the concept (absolute, or relative to ComfyUI's input folder); "
                        "leave empty to use the images input.")}),
                    "concept": ("STRING", {"default": "", "tooltip": (
                        "Prompt naming the concept: the caption of images without a .txt file.")}),
                    "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                           "tooltip": "Training resolution; 0 = the model's native one."}),
                    "crop": (["center", "resize"], {"tooltip": (
                        "center: shorter side to the resolution, then centre crop. resize: squash to a square.")}),
                    "keep": ("STRING", {"default": "", "tooltip": KEEP_TOOLTIP}),
                },
                "optional": {"images": ("IMAGE", {"tooltip": "A batch from any node, used when folder is empty."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, folder, concept, resolution, crop, keep="", images=None):
        if keep.strip() and not concept.strip():
            return "keep needs the concept's word: kept concepts take its place in the captions; fill in concept"
        if folder.strip():
            return _folder_problem(folder.strip()) or True
        return True

    def build(self, folder, concept, resolution, crop, keep="", images=None):
        if folder.strip():
            fs = ForgetSet.from_folder(resolve_folder(folder))
        elif images is not None:
            fs = ForgetSet.from_tensor(images)
        else:
            raise VDUError("no forget images: set folder to a folder of images or connect an IMAGE batch")
        fs.crop = crop
        return ({"forget": fs, "concept": concept.strip(), "anchor": "", "num_images": len(fs),
                 "resolution": resolution or None, "keep": keep_list(keep)},)


class VDUConcept(_ForgetSource):
    DESCRIPTION = "Prompt-only unlearning: the model generates images of the concept itself, then forgets them."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "concept": ("STRING", {"multiline": False, "default": "", "tooltip": "Prompt naming what to forget."}),
            "anchor": ("STRING", {"default": "", "tooltip": (
                "Safe prompt the concept should turn into (score_align); empty = unconditional.")}),
            "num_images": ("INT", {"default": _DEFAULTS.num_images, "min": 1, "max": 512,
                                   "tooltip": "Images to generate with the model itself."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                   "tooltip": "0 = the model's native resolution."}),
            "keep": ("STRING", {"default": "", "tooltip": KEEP_TOOLTIP}),
        }, "optional": {
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "Prompts naming the concept the way you use it, one per line (\"a red car on a street\"); "
                "the images are drawn from them in turn. Empty = the concept alone, which forgets less of "
                "the concept inside longer prompts.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, concept, anchor, num_images, resolution, keep="", prompts=""):
        if not concept.strip():
            return "the concept prompt is empty: type what the model should forget"
        stray = [p for p in prompt_lines(prompts) if not word_pattern([concept]).search(p)]
        if stray:
            return f"the prompt {stray[0]!r} does not name the concept {concept.strip()!r}; write it in every line"
        return True

    def build(self, concept, anchor, num_images, resolution, keep="", prompts=""):
        return ({"forget": None, "concept": concept.strip(), "anchor": anchor.strip(), "num_images": num_images,
                 "resolution": resolution or None, "keep": keep_list(keep),
                 "forget_prompts": prompt_lines(prompts)},)


def loss_curve(history, width=512, height=256) -> Image.Image:
    """The loss per step, min-max scaled, with its range written in the corner."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    values = [h["loss"] for h in history]
    if len(values) > 1:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        pts = [(10 + i * (width - 20) / (len(values) - 1), height - 20 - (v - lo) / span * (height - 40))
               for i, v in enumerate(values)]
        d.line(pts, fill=(30, 90, 200), width=2)
        d.text((12, 4), f"loss {values[-1]:.4g}  (range {lo:.3g} .. {hi:.3g}), {len(values)} steps", fill="black")
    return img


def pil_to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class VDUUnlearn:
    DESCRIPTION = ("Trains a LoRA that makes the model forget the concept (Variational Diffusion Unlearning or a "
                   "baseline objective). The input MODEL and CLIP are left untouched; the model and clip outputs "
                   "carry the LoRA, as a LoraLoader would.")
    # clip comes last so that workflows saved when the node had three outputs keep their links
    RETURN_TYPES = ("MODEL", LORA, "IMAGE", "CLIP")
    RETURN_NAMES = ("model", "lora", "loss_curve", "clip")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "forget": (FORGET,),
            "objective": (list(OBJECTIVES), {"default": d.objective}),
            "steps": ("INT", {"default": d.steps, "min": 1, "max": 100000}),
            "rank": ("INT", {"default": d.rank, "min": 1, "max": 256}),
            "learning_rate": ("FLOAT", {"default": d.lr, "min": 1e-7, "max": 1.0, "step": 1e-5}),
            "gamma": ("FLOAT", {"default": d.gamma, "min": 0.0, "max": 0.999, "step": 0.01,
                                "tooltip": "Weight of the stability regularizer (VDU)."}),
            "prior": (list(PRIORS)[:2], {"default": d.prior, "tooltip": (
                "fisher: protect what the model uses elsewhere; isotropic: one sigma.")}),
            "prior_sigma": ("FLOAT", {"default": d.prior_sigma, "min": 1e-6, "max": 100.0, "step": 1e-4}),
            "layers": (list(PRESETS), {"default": DEFAULT_PRESET}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": True}),
            "memory": (list(MEMORY_PRESETS), {"default": "fast", "tooltip": (
                "fast: nothing saved. balanced: one image per forward/backward pass. low: also gradient "
                "checkpointing (least memory, slowest). The learned LoRA is the same up to rounding.")}),
        }, "optional": {  # optional, so that API workflows saved before they existed still validate
            "own_images": ("INT", {"default": d.fisher_samples, "min": 1, "max": 1024, "tooltip": (
                "Images the model draws itself before training: what it must keep drawing (held by the "
                "replay and the prior), what the concept's prompts should draw instead, and the concept as "
                "it draws it for your images' captions, forgotten beside your images. Most of the "
                "set-up time; fewer = faster, weaker protection.")}),
            "sample_steps": ("INT", {"default": d.sample_steps, "min": 1, "max": 200, "tooltip": (
                "Sampler steps for every image the model draws itself (these, and a prompt-only run's "
                "images of the concept).")}),
            "text_steps": ("INT", {"default": d.text_steps, "min": 1, "max": 100000, "tooltip": (
                "Steps when VDU trains the text encoder instead of the UNet (a one-word concept shown in "
                "context: its word is taught to read as a nearby word); it stops early once that is learned. "
                "steps is then unused.")}),
            "text_destination": ("BOOLEAN", {"default": d.text_destination, "tooltip": (
                "Let VDU train the text encoder where it can (above). Off: it always trains the UNet.")}),
        }}

    def run(self, model, clip, vae, forget, objective, steps, rank, learning_rate, gamma, prior, prior_sigma,
            layers, seed, memory="fast", own_images=_DEFAULTS.fisher_samples, sample_steps=_DEFAULTS.sample_steps,
            text_steps=_DEFAULTS.text_steps, text_destination=_DEFAULTS.text_destination):
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils

        from .comfy_backend import ComfyBackend
        cfg = UnlearnConfig(objective=objective, concept=forget["concept"], anchor=forget["anchor"], steps=steps,
                            rank=rank, alpha=float(rank), lr=learning_rate, gamma=gamma, prior=prior,
                            prior_sigma=prior_sigma, layers=layers, seed=seed, num_images=forget["num_images"],
                            resolution=forget["resolution"], memory=memory, keep=forget.get("keep", []),
                            forget_prompts=forget.get("forget_prompts", []), fisher_samples=own_images,
                            sample_steps=sample_steps, text_steps=text_steps,
                            text_destination=text_destination).validate()
        bar = comfy.utils.ProgressBar(steps)
        history = []

        def progress(step, total, terms):
            mm.throw_exception_if_processing_interrupted()  # Cancel: stop now, keep nothing
            history.append(terms)
            preview = ("JPEG", loss_curve(history), 512) if step % 10 == 0 or step == total else None
            bar.update_absolute(step, total, preview)

        backend = ComfyBackend(model, clip, vae)
        result = unlearn(backend, cfg, forget["forget"], progress=progress)
        logging.info("[vdu-unlearn] %s", result.summary())  # ComfyUI's console: what the run chose
        patched, patched_clip = comfy.sd.load_lora_for_models(model, clip, result.lora, 1.0, 1.0)
        lora = {"state_dict": result.lora, "metadata": result.metadata}
        return (patched, lora, pil_to_image(loss_curve(result.history)), patched_clip)


def _lora_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


def _lora_target(filename: str):
    """The file under the first loras folder, or an error message if the name escapes it."""
    name = filename.strip()
    if not name:
        return None, "the file name is empty"
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = _lora_dir().resolve()
    path = (root / name).resolve()
    if os.path.isabs(filename.strip()) or root not in path.parents:
        return None, f"{filename!r} escapes the loras folder; use a plain name such as forget-red"
    return path, None


class VDUSaveLoRA:
    DESCRIPTION = "Writes the LoRA (kohya format) into the first models/loras folder, where LoraLoader lists it."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA,),
                             "filename": ("STRING", {"default": "unlearned/forget"}),
                             "overwrite": ("BOOLEAN", {"default": False})}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename, overwrite):
        _, problem = _lora_target(filename)
        return problem or True

    def save(self, lora, filename, overwrite):
        from ..vdu_engine.saving import atomic_save_file
        path, problem = _lora_target(filename)
        if problem:
            raise VDUError(problem)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(lora["state_dict"], path, lora["metadata"], overwrite=overwrite)
        name = path.relative_to(_lora_dir().resolve()).as_posix()
        return {"ui": {"text": [f"saved {name}"]}, "result": (name,)}


NODE_CLASS_MAPPINGS = {
    "VDUForgetImages": VDUForgetImages,
    "VDUConcept": VDUConcept,
    "VDUUnlearn": VDUUnlearn,
    "VDUSaveLoRA": VDUSaveLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VDUForgetImages": "Forget Images (VDU)",
    "VDUConcept": "Forget Concept Prompt (VDU)",
    "VDUUnlearn": "Unlearn Concept (VDU)",
    "VDUSaveLoRA": "Save Unlearning LoRA (VDU)",
}
