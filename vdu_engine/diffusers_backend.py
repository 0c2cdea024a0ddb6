"""The diffusers backend: SD 1.x, SD 2.x (v-prediction too) and SDXL, from a pipeline folder,
a single-file checkpoint (its configs read from its weights, see single_file.py; or taken from a
diffusers folder of the same architecture), or a pipeline object already in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .backend import (AdaptTarget, Backend, Cond, NoiseSchedule, UNET_BLOCKS, weights_fingerprint,
                      whole_word_vocabulary)
from .errors import VDUError
from .memory import checkpoint_blocks

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _schedule_from(scheduler_config: dict) -> NoiseSchedule:
    """ᾱ_t from the scheduler's config (the same formula diffusers' schedulers use)."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler.from_config(scheduler_config)
    return NoiseSchedule(sched.alphas_cumprod.float().clone(), sched.config.prediction_type)


class DiffusersBackend(Backend):
    def __init__(self, unet, vae, text_encoders: List, tokenizers: List, scheduler_config: dict,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or unet.dtype
        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if unet.config.in_channels != 4 or (not self.is_sdxl and unet.config.addition_embed_type):
            raise VDUError("unsupported architecture: vdu-unlearn handles SD 1.x, SD 2.x and SDXL text-to-image models")
        self.schedule = _schedule_from(scheduler_config)
        xattn = unet.config.cross_attention_dim
        self.base_model_version = ("sdxl_base_v1-0" if self.is_sdxl else
                                   "sd_v2" if xattn == 1024 else "sd_v1")
        # Read from the VAE rather than assumed: a small VAE may downsample less than SD's 8×.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(unet.config.sample_size) * self.vae_scale_factor
        self._hash = None
        for m in (unet, vae, *text_encoders):
            m.to(self.device)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "DiffusersBackend":
        tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
        return cls(pipe.unet, pipe.vae, tes, toks, dict(pipe.scheduler.config), **kw)

    @classmethod
    def load(cls, path, config_dir: Optional[str] = None, device: Optional[str] = None,
             dtype: Optional[torch.dtype] = None, prediction_type: Optional[str] = None,
             trust_pickle: bool = False) -> "DiffusersBackend":
        """A diffusers folder, or a .safetensors (or trusted .ckpt) single file, read on its own or
        with the configs of `config_dir`. prediction_type ("epsilon", "v_prediction"; None: detected
        or as configured) overrides the model's; trust_pickle allows a .ckpt, which can run code."""
        path = Path(path)
        if not path.exists():
            raise VDUError(f"model {path} does not exist; pass a diffusers folder or a .safetensors checkpoint")
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise VDUError(f"prediction type {prediction_type!r} is unknown; pass epsilon or v_prediction")
        if path.is_file():
            return cls._load_single_file(path, config_dir, device, dtype, prediction_type, trust_pickle)
        index = path / "model_index.json"
        if not index.exists() or not (path / "unet").is_dir():
            raise VDUError(f"{path} is not a Stable Diffusion model (no model_index.json and unet/); "
                           "pass a diffusers pipeline folder or a single-file checkpoint")
        name = json.loads(index.read_text()).get("_class_name", "")
        if name not in SUPPORTED:
            raise VDUError(f"unsupported architecture {name!r}; vdu-unlearn handles SD 1.x, SD 2.x and SDXL")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        kw = dict(torch_dtype=dtype) if dtype else {}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
        toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        if name == "StableDiffusionXLPipeline":
            tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
            toks.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        if prediction_type:
            sched["prediction_type"] = prediction_type
        return cls(unet, vae, tes, toks, sched, device=device, dtype=dtype)

    @classmethod
    def _load_single_file(cls, path, config_dir, device, dtype, prediction_type=None, trust_pickle=False):
        from .single_file import load_single_file, refuse_pickle
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise VDUError(f"{path} is not a Stable Diffusion checkpoint (.safetensors or .ckpt)")
        refuse_pickle(path, trust_pickle)
        if config_dir:
            return cls._load_with_config_dir(path, config_dir, device, dtype, prediction_type)
        m = load_single_file(path, prediction_type=prediction_type, trust_pickle=trust_pickle, dtype=dtype)
        return cls(m.unet, m.vae, m.text_encoders, m.tokenizers, m.scheduler_config, device=device, dtype=dtype)

    @classmethod
    def _load_with_config_dir(cls, path, config_dir, device, dtype, prediction_type):
        """For files whose configs cannot be read from their weights: diffusers' own loader, with the
        configs of a diffusers folder of the same architecture."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        index = Path(config_dir) / "model_index.json"
        if not index.is_file():
            raise VDUError(f"--config-dir {config_dir} is not a diffusers folder (no model_index.json); "
                           "pass a diffusers pipeline folder of the same architecture")
        name = json.loads(index.read_text()).get("_class_name", "")
        pipe_cls = StableDiffusionXLPipeline if name == "StableDiffusionXLPipeline" else StableDiffusionPipeline
        try:
            pipe = pipe_cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                             **({"torch_dtype": dtype} if dtype else {}))
        except Exception as e:
            raise VDUError(f"{path.name} could not be read as a {name or 'Stable Diffusion'} checkpoint "
                           f"({type(e).__name__}); check the file and --config-dir") from None
        if prediction_type:
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
        return cls.from_pipeline(pipe, device=device, dtype=dtype)

    # --- the Backend contract -----------------------------------------------------------
    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_fingerprint([self.unet, *self.text_encoders])
        return self._hash

    def denoise(self, x_t, t, cond: Cond):
        extra = {}
        if self.is_sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond["context"].to(self.dtype),
                         return_dict=False, **extra)[0]

    def encode_images(self, pixels):
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        lat = dist.mean  # the mode: the forget latents are data, not samples of the posterior
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        lat = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
        return (self.vae.decode(lat).sample.float() / 2 + 0.5).clamp(0, 1)

    def _tokens(self, tok, prompts):
        return tok(prompts, padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, prompts) -> Cond:
        if not self.is_sdxl:
            return {"context": self.text_encoders[0](self._tokens(self.tokenizers[0], prompts))[0]}
        hidden, pooled = [], None
        for te, tok in zip(self.text_encoders, self.tokenizers):
            out = te(self._tokens(tok, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts), device=self.device, dtype=pooled.dtype)
        return {"context": torch.cat(hidden, dim=-1), "pooled": pooled, "time_ids": time_ids}

    def text_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def vocabulary(self):
        return whole_word_vocabulary(self.tokenizers[0], self.text_encoders[0].get_input_embeddings().weight)

    def targets(self) -> List[AdaptTarget]:
        out = []
        for path, m in self.unet.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and path.split(".")[0] in UNET_BLOCKS:
                out.append(AdaptTarget("lora_unet_" + path.replace(".", "_"), "unet", path, m))
        prefixes = ["lora_te_"] if len(self.text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
        for i, (te, prefix) in enumerate(zip(self.text_encoders, prefixes)):
            for path, m in te.named_modules():
                if isinstance(m, nn.Linear) and ".encoder.layers." in f".{path}":
                    # transformers 5 dropped the `text_model.` level that kohya keys keep
                    kohya = "text_model." + path.removeprefix("text_model.")
                    out.append(AdaptTarget(prefix + kohya.replace(".", "_"), f"te{i + 1}", path, m))
        return out

    def checkpoint_blocks(self) -> List[nn.Module]:
        return checkpoint_blocks(self.unet)

    def encoder_modules(self) -> List[nn.Module]:
        return [self.vae, *self.text_encoders]

    def parameters(self) -> List[nn.Parameter]:
        return [p for m in (self.unet, self.vae, *self.text_encoders) for p in m.parameters()]

    def target_weights_from(self, path, keys: List[str]) -> Dict[str, torch.Tensor]:
        """The weights of the same layers in another checkpoint (for the ensemble prior)."""
        other = DiffusersBackend.load(path, device="cpu")
        found = {t.key: t.module.weight.detach() for t in other.targets() if t.key in set(keys)}
        missing = [k for k in keys if k not in found]
        mine = {t.key: t.module.weight.shape for t in self.targets()}
        if missing or any(found[k].shape != mine[k] for k in keys):
            raise VDUError(f"ensemble checkpoint {path} has a different architecture from the model; "
                           "pass checkpoints fine-tuned from the same base")
        return found
