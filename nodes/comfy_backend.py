"""The ComfyUI backend: presents ComfyUI's MODEL, CLIP and VAE to the engine.

The engine sees the raw UNet in DDPM terms, like the diffusers backend: x_t = sqrt(ᾱ) x0 +
sqrt(1 − ᾱ) ε with integer timesteps, and the network's own ε or v output. (ComfyUI's
`apply_model` works in σ-space; x_t is exactly its scaled input, so calling the UNet directly
skips two conversions that would cancel.)

Training runs on a private copy of the diffusion model, made after ComfyUI has loaded the MODEL
with any LoRAs already applied to it. Two reasons: ComfyUI builds models inside inference mode,
so their weights are inference tensors that autograd cannot save for backward; and the user's
MODEL, shared with every other branch of the graph, must never change.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn

from ..vdu_engine.backend import (AdaptTarget, Backend, Cond, NoiseSchedule, UNET_BLOCKS, weights_fingerprint,
                                  whole_word_vocabulary)
from ..vdu_engine.errors import VDUError
from ..vdu_engine.memory import checkpoint_blocks

CONTEXT_TOKENS = 77


def _diffusers_names(unet_config) -> dict:
    """ComfyUI (LDM) module path → diffusers module path, for the UNet's weights."""
    import comfy.utils
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    return {ldm[:-len(".weight")]: diff[:-len(".weight")] for diff, ldm in mapping.items() if diff.endswith(".weight")}


class ComfyBackend(Backend):
    def __init__(self, model, clip, vae):
        import comfy.model_base
        import comfy.model_management as mm
        base = model.model
        if not isinstance(base, (comfy.model_base.BaseModel,)) or getattr(base, "diffusion_model", None) is None:
            raise VDUError("this MODEL is not a Stable Diffusion UNet; load an SD 1.x, SD 2.x or SDXL checkpoint")
        kind = type(base).__name__
        if kind not in ("BaseModel", "SD21UNCLIP", "SDXL") or base.model_config.unet_config.get("in_channels", 4) != 4:
            raise VDUError(f"unsupported model type {kind}; vdu-unlearn handles SD 1.x, SD 2.x and SDXL checkpoints")
        self.is_sdxl = kind == "SDXL"
        self.clip, self.vae, self.base = clip, vae, base
        self.latent_format = base.latent_format
        patcher = model.clone()
        mm.load_models_gpu([patcher], force_full_load=True)  # applies the MODEL's own patches
        self.device = patcher.load_device
        with torch.inference_mode(False):
            self.unet = copy.deepcopy(base.diffusion_model).requires_grad_(False)  # normal tensors
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.unet.to(self.device)
        sigmas = base.model_sampling.sigmas.detach().float().cpu()
        prediction = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(base.model_type.name)
        if prediction is None:
            raise VDUError(f"unsupported prediction type {base.model_type.name}; use an epsilon or v-prediction model")
        self.schedule = NoiseSchedule((1.0 / (1.0 + sigmas ** 2)).clone(), prediction)
        context_dim = base.model_config.unet_config.get("context_dim")
        self.base_model_version = "sdxl_base_v1-0" if self.is_sdxl else ("sd_v2" if context_dim == 1024 else "sd_v1")
        self.resolution = 1024 if self.is_sdxl else (768 if prediction == "v_prediction" else 512)
        self._names = _diffusers_names(base.model_config.unet_config)
        self._hash = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_fingerprint([self.unet])
        return self._hash

    def denoise(self, x_t, t, cond: Cond):
        extra = {"y": cond["y"].to(self.device, self.dtype)} if "y" in cond else {}
        return self.unet(x_t.to(self.device, self.dtype), t.to(self.device).float(),
                         context=cond["context"].to(self.device, self.dtype), **extra)

    def encode_text(self, prompts) -> Cond:
        ctx, pooled = [], []
        for p in prompts:
            c, pl = self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)
            ctx.append(c[:, :CONTEXT_TOKENS].float())
            pooled.append(pl.float() if pl is not None else None)
        cond = {"context": torch.cat(ctx).to(self.device)}
        if self.is_sdxl:
            r = self.resolution
            cond["y"] = torch.cat([self.base.encode_adm(pooled_output=p, width=r, height=r, target_width=r,
                                                        target_height=r) for p in pooled]).float().to(self.device)
        return cond

    def vocabulary(self):
        """CLIP-L's whole-word tokens and their input embeddings, from ComfyUI's own CLIP objects
        (`clip.tokenizer.clip_l.tokenizer` is a transformers CLIPTokenizer; the encoder's
        `transformer.get_input_embeddings()` its token table). None where a text encoder is built
        otherwise: the run then skips the search for synonyms and neighbours."""
        try:
            tok = self.clip.tokenizer.clip_l.tokenizer
            table = self.clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
        except AttributeError:
            return None
        return whole_word_vocabulary(tok, table)

    def encode_images(self, pixels):
        x = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # ComfyUI IMAGE: BHWC in [0, 1]
        return self.latent_format.process_in(self.vae.encode(x).float()).to(self.device)

    def decode_latents(self, latents):
        img = self.vae.decode(self.latent_format.process_out(latents.float().cpu()))
        img = img.reshape(-1, *img.shape[-3:])  # some VAEs add a frame dimension
        return img.permute(0, 3, 1, 2).float().clamp(0, 1)

    def targets(self) -> List[AdaptTarget]:
        out = []
        for path, m in self.unet.named_modules():
            diff = self._names.get(path, "")
            # the same layer set as the diffusers backend: the down, mid and up blocks
            if isinstance(m, (nn.Linear, nn.Conv2d)) and diff.split(".")[0] in UNET_BLOCKS:
                out.append(AdaptTarget("lora_unet_" + diff.replace(".", "_"), "unet", diff, m))
        return out

    def checkpoint_blocks(self) -> List[nn.Module]:
        return checkpoint_blocks(self.unet)

    # encoder_modules: none. ComfyUI's model management already moves CLIP and the VAE off the
    # GPU when the UNet needs the memory.

    def parameters(self) -> List[nn.Parameter]:
        return list(self.unet.parameters())

    def target_weights_from(self, path, keys):
        raise VDUError("the ensemble prior is not available in ComfyUI yet; use prior fisher or isotropic")
