"""What the tab needs from the running WebUI (A1111 1.10 or Forge), in one place: the loaded model
as an engine backend, the LoRA folder, and the job state (progress, Interrupt).

Both WebUIs expose the same `modules.shared`: `sd_model`, `cmd_opts.lora_dir` (the Lora
extension's --lora-dir, default models/Lora) and `state` (the job the progress bar polls).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..vdu_engine.errors import VDUError
from .fixes import FORGE_FIXES, WEBUI_FIXES


def shared():
    from modules import shared as s
    return s


def is_forge() -> bool:
    import importlib.util
    return importlib.util.find_spec("modules_forge") is not None


def current_backend():
    """The loaded checkpoint as a backend: Forge's engine object or A1111's LDM model."""
    if is_forge():
        from modules import sd_models
        sd_models.forge_model_reload()  # Forge loads the selected checkpoint lazily, as before a generation
    model = shared().sd_model
    if model is None or (is_forge() and not hasattr(model, "forge_objects")):
        raise VDUError("no checkpoint is loaded; pick one in the Stable Diffusion checkpoint menu")
    if is_forge():
        from .forge_backend import ForgeBackend
        backend = ForgeBackend(model)
    else:
        from ..vdu_engine.ldm_backend import LDMBackend
        _refuse_merged_loras(model)
        backend = LDMBackend(model)
    backend.fixes = FORGE_FIXES if is_forge() else WEBUI_FIXES
    return backend


def _refuse_merged_loras(model) -> None:
    """A1111's Lora extension merges the last generation's LoRAs into the weights, lazily, and keeps
    them there until a generation without them: training then would learn on top of them."""
    parts = [model.model.diffusion_model, getattr(model, "cond_stage_model", None)]
    for m in (m for part in parts if isinstance(part, nn.Module) for m in part.modules()):
        if getattr(m, "network_current_names", ()):
            raise VDUError("a LoRA from the last generation is still merged into the model; "
                           "generate once without <lora:…> in the prompt, then train")


def lora_dir() -> Path:
    return Path(shared().cmd_opts.lora_dir)


def lora_target(name: str, overwrite: bool) -> Path:
    """The file under the LoRA folder for a name (sub-folders allowed), or VDUError if the name is
    empty, escapes the folder, or names an existing file without overwrite."""
    raw = name.strip()
    if not raw:
        raise VDUError("the LoRA name is empty; type a name such as forget-red")
    file = raw if raw.endswith(".safetensors") else raw + ".safetensors"
    root = lora_dir().resolve()
    path = (root / file).resolve()
    if os.path.isabs(raw) or root not in path.parents:
        raise VDUError(f"{raw!r} escapes the LoRA folder; use a plain name such as forget-red")
    if path.exists() and not overwrite:
        raise VDUError(f"{path.relative_to(root)} already exists; tick overwrite or choose another name")
    return path


class Job:
    """The WebUI's job state for one run: the progress bar reads `state`, Interrupt sets it."""

    def __init__(self, total: int):
        self.state = shared().state
        self.state.job_count, self.state.job_no = 1, 0
        self.state.sampling_steps, self.state.sampling_step = total, 0

    @property
    def interrupted(self) -> bool:
        return bool(self.state.interrupted)

    def step(self, step: int, total: int, text: str, preview=None) -> None:
        self.state.sampling_steps, self.state.sampling_step = total, step
        self.state.textinfo = text
        if preview is not None:
            self.state.assign_current_image(preview)
