"""The LDM backend: a CompVis / Stability "LatentDiffusion" model object, as A1111's WebUI holds it.

A1111 keeps the loaded checkpoint as `shared.sd_model`: `model.diffusion_model` (the UNet, LDM
layout: input_blocks / middle_block / output_blocks), `cond_stage_model` (CLIP, or OpenCLIP for
SD 2.x) or `conditioner` (SDXL), `first_stage_model` (the VAE), `alphas_cumprod` and
`parameterization` ("eps" or "v"). This module reads those attributes only: it imports nothing
from the WebUI, ldm or sgm, so the engine stays free of them.

The user's model is never changed: the engine trains its deltas beside the layers through
forward hooks (lora.py) and removes them after, so nothing here copies or patches a weight.
Text goes through `model.get_learned_conditioning`, the WebUI's own prompt path (emphasis,
embeddings, CLIP skip), truncated to its first 77 tokens so every prompt has one length.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .backend import (AdaptTarget, Backend, Cond, NoiseSchedule, UNET_BLOCKS, weights_fingerprint,
                      whole_word_vocabulary)
from .errors import VDUError
from .memory import checkpoint_blocks

CONTEXT_TOKENS = 77
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _kind(block: nn.Module) -> str:
    return type(block).__name__  # ldm, sgm and Forge name these classes alike


def _inner(ldm_prefix: str, diff_prefix: str, block: nn.Module, out: Dict[str, str]) -> None:
    """Module paths inside one LDM sub-block (a ResBlock, a SpatialTransformer, a sampler)."""
    kind = _kind(block)
    for name, _ in block.named_modules():
        if kind == "ResBlock":
            diff = _RESNET.get(name)
        elif kind in ("Downsample", "Upsample"):
            diff = "conv" if name in ("op", "conv") else None
        else:  # SpatialTransformer: diffusers keeps the same names inside (norm, proj_in, transformer_blocks…)
            diff = name or None
        if diff:
            out[f"{ldm_prefix}.{name}" if name else ldm_prefix] = f"{diff_prefix}.{diff}"


def ldm_to_diffusers_names(unet: nn.Module) -> Dict[str, str]:
    """LDM module path → diffusers module path for every named layer of an LDM UNet, read from
    the module tree itself (the config differs between SD 1.x, 2.x and SDXL; the tree says it all):
    a level of input_blocks ends at its Downsample, a level of output_blocks at its Upsample."""
    out = dict(_TOP)
    level, j = 0, 0
    for i, blk in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if _kind(blk[0]) == "Downsample":
            _inner(f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", blk[0], out)
            level, j = level + 1, 0
            continue
        _sub_blocks(f"input_blocks.{i}", f"down_blocks.{level}", j, blk, out)
        j += 1
    attn = 0
    for k, sub in enumerate(unet.middle_block):
        is_res = _kind(sub) == "ResBlock"
        _inner(f"middle_block.{k}", f"mid_block.{'resnets' if is_res else 'attentions'}.{k // 2 if is_res else attn}",
               sub, out)
    level, j = 0, 0
    for i, blk in enumerate(unet.output_blocks):
        _sub_blocks(f"output_blocks.{i}", f"up_blocks.{level}", j, blk, out)
        if any(_kind(sub) == "Upsample" for sub in blk):
            level, j = level + 1, 0
        else:
            j += 1
    return out


def _sub_blocks(ldm_prefix: str, diff_prefix: str, j: int, blk: nn.Module, out: Dict[str, str]) -> None:
    for k, sub in enumerate(blk):
        kind = _kind(sub)
        part = {"ResBlock": f"resnets.{j}", "Upsample": "upsamplers.0"}.get(kind, f"attentions.{j}")
        _inner(f"{ldm_prefix}.{k}", f"{diff_prefix}.{part}", sub, out)


def _context_dim(unet: nn.Module) -> Optional[int]:
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(m, nn.Linear):
            return m.in_features
    return None


class LDMUNetBackend(Backend):
    """What every host with an LDM-layout UNet shares (A1111 and SGM here, ComfyUI and Forge in their
    adapters): `self.unet` called with `context` (and SDXL's `y`), its layers named through
    `self._names` (LDM module path → diffusers path), its weights fingerprinted once."""

    _hash: Optional[str] = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_fingerprint([self.unet])
        return self._hash

    def denoise(self, x_t, t, cond: Cond):
        extra = {"y": cond["y"].to(self.device, self.dtype)} if "y" in cond else {}
        return self.unet(x_t.to(self.device, self.dtype), t.to(self.device).float(),
                         context=cond["context"].to(self.device, self.dtype), **extra)

    def targets(self) -> List[AdaptTarget]:
        out = []
        for path, m in self.unet.named_modules():
            diff = self._names.get(path, "")
            # the same layer set as the diffusers backend: the down, mid and up blocks
            if self._is_layer(m) and diff.split(".")[0] in UNET_BLOCKS:
                out.append(AdaptTarget("lora_unet_" + diff.replace(".", "_"), "unet", diff, m))
        return out

    def _is_layer(self, m: nn.Module) -> bool:
        """A layer a LoRA may adapt (hosts' cast layers subclass these)."""
        return isinstance(m, (nn.Linear, nn.Conv2d))

    def checkpoint_blocks(self) -> List[nn.Module]:
        return checkpoint_blocks(self.unet)

    def parameters(self) -> List[nn.Parameter]:
        return list(self.unet.parameters())

    def target_weights_from(self, path, keys):
        raise VDUError("the ensemble prior is not available in this host yet; use prior fisher or isotropic")


class LDMBackend(LDMUNetBackend):
    """`model`: an ldm LatentDiffusion or sgm DiffusionEngine with A1111's attributes (or a model of
    the same layout). `encode_prompts`: prompts → conditioning as the model's
    `get_learned_conditioning` returns it (a tensor, or SDXL's dict), the default."""

    def __init__(self, model, encode_prompts: Optional[Callable] = None):
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
        if unet is None or not hasattr(unet, "input_blocks"):
            raise VDUError("the loaded model has no LDM UNet (model.diffusion_model); "
                           "load an SD 1.x, 2.x or SDXL checkpoint")
        if (getattr(model, "is_sd3", False) or getattr(model, "is_sdxl_inpaint", False)
                or unet.input_blocks[0][0].in_channels != 4):
            raise VDUError("this checkpoint is not a text-to-image SD 1.x, 2.x or SDXL model; load one of those")
        self.model, self.unet = model, unet
        self.is_sdxl = hasattr(model, "conditioner")
        self._encode = encode_prompts or model.get_learned_conditioning
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.schedule = _schedule(model)
        v = self.schedule.prediction_type == "v_prediction"
        self.base_model_version = ("sdxl_base_v1-0" if self.is_sdxl else
                                   "sd_v2" if _context_dim(unet) == 1024 else "sd_v1")
        self.resolution = 1024 if self.is_sdxl else (768 if v else 512)
        self._names = ldm_to_diffusers_names(unet)
        self._hash = None

    def encode_text(self, prompts, encode: Optional[Callable] = None) -> Cond:
        """Prompts through `encode` (default: the model's own prompt path)."""
        c = (encode or self._encode)(list(prompts))
        ctx = (c["crossattn"] if isinstance(c, dict) else c)[:, :CONTEXT_TOKENS]
        # .clone(): a normal tensor even where the WebUI encodes in inference mode
        cond = {"context": ctx.float().clone().to(self.device)}
        if isinstance(c, dict) and "vector" in c:
            cond["y"] = c["vector"].float().clone().to(self.device)
        return cond

    def targets(self) -> List[AdaptTarget]:
        return super().targets() + text_targets(self._clip_l())

    def parameters(self) -> List[nn.Parameter]:
        text = self._clip_l()
        return super().parameters() + (list(text.parameters()) if text is not None else [])

    def _clip_l(self) -> Optional[nn.Module]:
        """SD 1.x's text encoder, the transformers CLIPTextModel inside A1111's wrapper (`cond_stage_model.wrapped
        .transformer`), whose layers the engine can adapt. None for SD 2.x and SDXL: their (second) text encoder
        is OpenCLIP, whose attention is one fused nn.MultiheadAttention, not the q/k/v layers a LoRA's
        `self_attn_q_proj` keys name, so their runs train the UNet."""
        if self.is_sdxl:
            return None
        enc = self.model.cond_stage_model
        transformer = getattr(getattr(enc, "wrapped", enc), "transformer", None)
        return transformer if hasattr(getattr(transformer, "text_model", None), "encoder") else None

    def encode_images(self, pixels):
        fs = self.model.first_stage_model
        x = pixels.to(self.device, next(fs.parameters()).dtype)
        moments = fs.quant_conv(fs.encoder(x)) if getattr(fs, "quant_conv", None) is not None else fs.encoder(x)
        mean = moments.chunk(2, dim=1)[0]  # the posterior's mode: the forget latents are data, not samples
        return (mean.float() * float(self.model.scale_factor)).to(self.device)

    def decode_latents(self, latents):
        fs = self.model.first_stage_model
        img = self.model.decode_first_stage(latents.to(self.device, next(fs.parameters()).dtype))
        return ((img.float() + 1) / 2).clamp(0, 1)

    def vocabulary(self):
        """CLIP-L's whole words and token table, where the text encoder is a transformers CLIP with
        its tokenizer beside it (SD 1.x; SDXL's first encoder); None otherwise (SD 2.x's OpenCLIP):
        the run then skips the search for synonyms and neighbours."""
        enc = self.model.conditioner.embedders[0] if self.is_sdxl else self.model.cond_stage_model
        for obj in (enc, getattr(enc, "wrapped", None)):
            tok, tr = getattr(obj, "tokenizer", None), getattr(obj, "transformer", None)
            if hasattr(tok, "get_vocab") and hasattr(tr, "get_input_embeddings"):
                table = tr.get_input_embeddings()
                # A1111's hijack puts the table inside its textual-inversion wrapper (EmbeddingsWithFixes)
                table = getattr(table, "weight", None) if hasattr(table, "weight") else table.wrapped.weight
                return whole_word_vocabulary(tok, table)
        return None


def text_targets(transformer: Optional[nn.Module], is_layer: Optional[Callable] = None) -> List[AdaptTarget]:
    """The linear layers (`is_layer`; default nn.Linear) of a CLIPTextModel's transformer blocks under their kohya
    keys (lora_te_text_model_encoder_layers_0_self_attn_q_proj), which the WebUIs, ComfyUI and diffusers read."""
    if transformer is None:
        return []
    is_layer = is_layer or (lambda m: isinstance(m, nn.Linear))
    return [AdaptTarget("lora_te_" + path.replace(".", "_"), "te1", path, m) for path, m in transformer.named_modules()
            if is_layer(m) and path.startswith("text_model.encoder.layers.")]


def _schedule(model) -> NoiseSchedule:
    # the original schedule: A1111 may downcast alphas_cumprod for sampling (an option), never for training
    ac = getattr(model, "alphas_cumprod_original", None)
    ac = getattr(model, "alphas_cumprod", None) if ac is None else ac
    if ac is None:
        raise VDUError("the loaded model has no noise schedule (alphas_cumprod); "
                       "load an SD 1.x, 2.x or SDXL checkpoint")
    kind = {"eps": "epsilon", "v": "v_prediction"}.get(getattr(model, "parameterization", "eps"))
    if kind is None:
        raise VDUError(f"unsupported prediction type {model.parameterization!r}; use an epsilon or v-prediction model")
    return NoiseSchedule(torch.as_tensor(ac).detach().float().cpu().clone(), kind)
