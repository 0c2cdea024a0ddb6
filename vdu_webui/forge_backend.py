"""The Forge backend: Forge's loaded model (`shared.sd_model`, a ForgeDiffusionEngine) to the engine.

Forge's model objects are ComfyUI's, renamed: a UnetPatcher holding a KModel with
`diffusion_model` (LDM layout, ComfyUI's UNet), a σ-space `predictor`, and the copy of ComfyUI's
`unet_to_diffusers` that Forge's LoRA loader uses. So the UNet side is the ComfyUI backend's, reused as it is
(`ComfyStyleBackend`: a private copy, since Forge also loads in inference mode and patches
LoRAs into the live weights). Text and images go through the engine object's own
`get_learned_conditioning` / `encode_first_stage` / `decode_first_stage`, the A1111-compatible
API that the LDM backend reads too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nodes.comfy_backend import ComfyStyleBackend, _trainable_weights
from ..vdu_engine.backend import whole_word_vocabulary
from ..vdu_engine.errors import VDUError
from ..vdu_engine.ldm_backend import LDMBackend, text_targets


class ForgeBackend(ComfyStyleBackend):
    def __init__(self, engine):
        from backend import memory_management as mm
        # the map Forge's own LoRA loader reads keys with (its copy of ComfyUI's utils)
        from packages_3rdparty.comfyui_lora_collection.utils import unet_to_diffusers
        if not any(getattr(engine, f"is_{k}", False) for k in ("sd1", "sd2", "sdxl")) or engine.is_inpaint:
            raise VDUError("the loaded checkpoint is not a text-to-image SD 1.x, 2.x or SDXL model; load one of those")
        self.engine = engine
        # The checkpoint itself, not the LoRAs of the last generation: loading the original patcher
        # restores its weights, as Forge does before every generation without a LoRA.
        patcher = engine.forge_objects_original.unet
        mm.load_model_gpu(patcher)
        kmodel = patcher.model
        self._adopt_unet(kmodel.diffusion_model, kmodel.predictor.sigmas, kmodel.predictor.prediction_type,
                         unet_to_diffusers(kmodel.diffusion_model.config), bool(engine.is_sdxl),
                         patcher.load_device, kmodel.computation_dtype)
        self._encode = engine.get_learned_conditioning
        _save_norm_inputs(self.unet)

    def encode_text(self, prompts):
        """The engine object's own prompt path (same truncation and clone as A1111's). Forge runs it in
        inference mode, where no gradient flows; while the text encoder's deltas train, the same
        text-processing engine is called directly, on the checkpoint's own CLIP (no LoRA patched in)."""
        if not (torch.is_grad_enabled() and self._clip_l() is not None):
            return LDMBackend.encode_text(self, prompts)
        self._load_clip()  # loaded by parameters() at the run's start: silent and instant while it stays
        return LDMBackend.encode_text(self, prompts, encode=self.engine.text_processing_engine)

    def targets(self):
        return super().targets() + text_targets(self._clip_l(), self._is_layer)

    def parameters(self):
        """The UNet copy's weights and CLIP-L's. Forge loads CLIP-L in inference mode, whose tensors neither take
        gradients nor let the run freeze and unfreeze them: they are swapped for ordinary tensors of the same
        values first (as ComfyUI's are), so the run's freezing and the backward pass through CLIP work."""
        clip_l = self._clip_l()
        if clip_l is None:
            return super().parameters()
        self._prepare_clip(clip_l)
        return super().parameters() + list(clip_l.parameters())

    def _prepare_clip(self, clip_l):
        """At the run's start, outside inference mode: CLIP loaded, its inference tensors swapped, and its
        embeddings cast as Forge's text engine casts them. The engine casts CLIP's token and position embeddings
        to fp32 on every call (a no-op once they are), by swapping their data for a copy made in the mode it runs
        in; the first call would otherwise come in inference mode, with the run's first prompts, and the weights
        the run froze would come back as inference tensors, which cannot take requires_grad again when the run
        restores the flags."""
        with torch.inference_mode(False):
            self._load_clip()
            _trainable_weights(clip_l)
            with torch.no_grad():
                self.engine.text_processing_engine([""])

    def _load_clip(self):
        from backend import memory_management as mm
        with torch.inference_mode(False):
            mm.load_model_gpu(self._clip().patcher)  # returns at once, printing nothing, while it is loaded

    def _clip_l(self):
        """SD 1.x's text encoder, the transformers CLIPTextModel inside Forge's CLIP (`clip_l.transformer`), where
        Forge encodes through one text-processing engine. None for SD 2.x and SDXL (several engines, pooled
        outputs and Forge's own conditioning dict): their runs train the UNet."""
        if not getattr(self.engine, "is_sd1", False) or not hasattr(self.engine, "text_processing_engine"):
            return None
        return getattr(getattr(self._clip().cond_stage_model, "clip_l", None), "transformer", None)

    def _clip(self):
        return self.engine.forge_objects_original.clip

    def _is_layer(self, m) -> bool:
        """Forge's own Linear (backend/operations.py) is a Module with in/out_features and a 2-D
        weight, not an nn.Linear; the engine's deltas need only those (its Conv2d subclasses nn's)."""
        w = getattr(m, "weight", None)
        return super()._is_layer(m) or (hasattr(m, "out_features") and w is not None and w.dim() == 2)

    def encode_images(self, pixels):
        return self.engine.encode_first_stage(pixels.to(self.device)).float().clone()

    def decode_latents(self, latents):
        img = self.engine.decode_first_stage(latents.to(self.device).float())
        return ((img.float().clone() + 1) / 2).clamp(0, 1)

    def vocabulary(self):
        """CLIP-L's whole words and token table from Forge's CLIP object (a transformers CLIPTokenizer, and
        a CLIPTextModel at `clip_l.transformer`); None where there is no CLIP-L (SD 2.x)."""
        clip = self._clip()
        try:
            tok, te = clip.tokenizer.clip_l, clip.cond_stage_model.clip_l.transformer
            return whole_word_vocabulary(tok, te.get_input_embeddings().weight)
        except AttributeError:
            return None


def _save_norm_inputs(unet: nn.Module) -> None:
    """Forge's transformer blocks add their residuals in place (`x += n`, backend/nn/unet.py) after a
    LayerNorm has saved that x for the backward pass, which autograd then refuses. On the private
    copy only, each LayerNorm is handed a copy of its input while gradients are recorded."""
    def copy_input(module, args):
        return (args[0].clone(), *args[1:]) if torch.is_grad_enabled() else None
    for m in unet.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_pre_hook(copy_input)
