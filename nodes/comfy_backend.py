"""The ComfyUI backend: presents ComfyUI's MODEL, CLIP and VAE to the engine.

The engine sees the raw UNet in DDPM terms, like the diffusers backend: x_t = sqrt(ᾱ) x0 +
sqrt(1 − ᾱ) ε with integer timesteps, and the network's own ε or v output. (ComfyUI's
`apply_model` works in σ-space; x_t is exactly its scaled input, so calling the UNet directly
skips two conversions that would cancel.)

In ComfyUI, training runs on the MODEL's own diffusion model, loaded through a clone of its
ModelPatcher (so any LoRAs already applied to it are applied, as for sampling): one UNet on the
device, as ComfyUI's own TrainLoraNode holds. The deltas ride on forward hooks, removed after the
run, and the weights are never written, so the MODEL every other branch of the graph shares stays
bit-identical. One thing does change: ComfyUI loads weights inside inference mode, as inference
tensors, which autograd cannot save for backward; each is replaced once by an ordinary tensor with
the same values (`_trainable_weights`), which ComfyUI's sampling and patching treat alike.
(Forge, which shares `ComfyStyleBackend`, still trains on a private copy.)
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ..vdu_engine.backend import AdaptTarget, Backend, Cond, NoiseSchedule, whole_word_vocabulary
from ..vdu_engine.errors import VDUError
from ..vdu_engine.ldm_backend import LDMUNetBackend

CONTEXT_TOKENS = 77
# ComfyUI's CLIP encoders, in the order of the kohya prefixes lora_te1_ / lora_te2_ where there are two (SDXL);
# SD 2.x has one, OpenCLIP-H, which ComfyUI holds in HF CLIP layout as clip_h (comfy/lora.py, model_lora_keys_clip)
TEXT_ENCODERS = ("clip_l", "clip_h", "clip_g")


def _diffusers_names(mapping) -> dict:
    """LDM module path → diffusers module path, from a `unet_to_diffusers` weight map (ComfyUI's, or
    the copy Forge keeps in backend/misc/diffusers_state_dict.py)."""
    return {ldm[:-len(".weight")]: diff[:-len(".weight")] for diff, ldm in mapping.items() if diff.endswith(".weight")}


def _trainable_weights(module: torch.nn.Module) -> None:
    """Replace each inference-tensor parameter by an ordinary tensor with the same values and flags,
    one at a time (so at most one extra weight is held)."""
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)


@contextmanager
def _norms_read_copies(transformers):
    """ComfyUI's CLIP layers add their residuals in place (`x += self_attn(layer_norm1(x))`, comfy/clip_model.py),
    over the tensor the layer norm keeps for its backward pass, which autograd refuses once gradients flow through
    the encoder. While they do, each layer norm reads a copy."""
    norms = [m for t in transformers for name, m in t.named_modules()
             if name.endswith((".layer_norm1", ".layer_norm2"))]
    handles = [m.register_forward_pre_hook(lambda module, args: (args[0].clone(), *args[1:])) for m in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _plain(tokens: dict) -> bool:
    """Whether a prompt tokenized by ComfyUI carries no (word:weight) emphasis."""
    return all(pair[1] == 1.0 for chunks in tokens.values() for chunk in chunks for pair in chunk)


class ComfyStyleBackend(LDMUNetBackend):
    """What ComfyUI and Forge share: a ComfyUI-style diffusion model (LDM layout, a σ schedule, a
    `unet_to_diffusers` map). Subclasses bring text and images, and choose whether to copy the UNet."""

    def _adopt_unet(self, diffusion_model, sigmas, prediction: str, mapping: dict, is_sdxl: bool, device, dtype,
                    private_copy: bool = True):
        """Take the loaded diffusion model (`private_copy`: a copy of it, in normal tensors, so that
        the host's model can never change), read its schedule, size and layer names."""
        self.is_sdxl, self.device, self.dtype = is_sdxl, device, dtype
        if private_copy:
            with torch.inference_mode(False):
                self.unet = copy.deepcopy(diffusion_model).requires_grad_(False)
            self.unet.to(self.device)
        else:
            self.unet = diffusion_model
        if prediction not in ("epsilon", "v_prediction"):
            raise VDUError(f"unsupported prediction type {prediction}; use an epsilon or v-prediction model")
        sigmas = sigmas.detach().float().cpu()
        self.schedule = NoiseSchedule((1.0 / (1.0 + sigmas ** 2)).clone(), prediction)
        context_dim = next((m.in_features for n, m in self.unet.named_modules()
                            if n.endswith("attn2.to_k") and self._is_layer(m)), None)
        self.base_model_version = "sdxl_base_v1-0" if is_sdxl else ("sd_v2" if context_dim == 1024 else "sd_v1")
        self.resolution = 1024 if is_sdxl else (768 if prediction == "v_prediction" else 512)
        self._names = _diffusers_names(mapping)
        self._hash = None


class ComfyBackend(ComfyStyleBackend):
    # The fixes the engine's nan/inf errors name (Backend.fixes), in ComfyUI's words: its launch flags
    # (comfy/cli_args.py) choose each part's dtype, and the Unlearn node's inputs are the run's settings.
    fixes = {
        **Backend.fixes,  # a part added there later still gets an (engine-worded) fix here
        "vae": "launch ComfyUI with --fp32-vae, or load a fixed VAE such as sdxl-vae-fp16-fix with a Load VAE node",
        "text_encoder": "launch ComfyUI with --fp32-text-enc",
        "unet": "launch ComfyUI with --fp32-unet",
        "fisher": "launch ComfyUI with --fp32-unet, or set prior to isotropic",
        "lr": "lower learning_rate",
    }

    def __init__(self, model, clip, vae):
        import comfy.model_base
        import comfy.model_management as mm
        import comfy.utils
        base = model.model
        if not isinstance(base, (comfy.model_base.BaseModel,)) or getattr(base, "diffusion_model", None) is None:
            raise VDUError("this MODEL is not a Stable Diffusion UNet; load an SD 1.x, SD 2.x or SDXL checkpoint")
        kind = type(base).__name__
        if kind not in ("BaseModel", "SD21UNCLIP", "SDXL") or base.model_config.unet_config.get("in_channels", 4) != 4:
            raise VDUError(f"unsupported model type {kind}; vdu-unlearn handles SD 1.x, SD 2.x and SDXL checkpoints")
        self.clip, self.vae, self.base = clip, vae, base
        self.latent_format = base.latent_format
        self.patcher = model.clone()
        prediction = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(base.model_type.name, base.model_type.name)
        self._adopt_unet(base.diffusion_model, base.model_sampling.sigmas, prediction,
                         comfy.utils.unet_to_diffusers(base.model_config.unet_config), kind == "SDXL",
                         self.patcher.load_device, base.manual_cast_dtype or base.get_dtype(), private_copy=False)
        self._ensure_loaded()

    def _ensure_loaded(self):
        """The MODEL fully loaded on its device with its own patches, in trainable weights. ComfyUI
        may move it off the device to make room while the run encodes with CLIP or the VAE, and
        (re)loading it in inference mode brings inference tensors back."""
        import comfy.model_management as mm
        m, p = self.patcher.model, self.patcher
        if not m.model_lowvram and m.current_weight_patches_uuid == p.patches_uuid and m.device == p.load_device \
                and self._trainable:
            return
        mm.load_models_gpu([p], force_full_load=True)  # applies the MODEL's own patches, as sampling does
        _trainable_weights(self.unet)
        self._trainable = True

    _trainable = False  # set once the weights are ordinary tensors; a reload may bring inference ones back

    def denoise(self, x_t, t, cond: Cond):
        # Cancel stops the run at the next UNet call, set-up included (image generation, the pools of
        # frozen predictions), as ComfyUI's own samplers check at every step.
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()
        self._ensure_loaded()
        return super().denoise(x_t, t, cond)

    def targets(self):
        return super().targets() + self._text_targets()

    def _text_encoders(self):
        """(name, transformer) of each CLIP text encoder the CLIP holds, in kohya order."""
        model = getattr(self.clip, "cond_stage_model", None)
        found = [(n, getattr(model, n, None)) for n in TEXT_ENCODERS]
        return [(n, getattr(e, "transformer", None)) for n, e in found if e is not None
                and getattr(e, "transformer", None) is not None]

    def _text_targets(self):
        """The linear layers of each text encoder's transformer blocks, under the kohya keys that ComfyUI's
        LoraLoader, the WebUI and diffusers all read (lora_te_text_model_encoder_layers_0_self_attn_q_proj)."""
        encoders = self._text_encoders()
        prefixes = ["lora_te_"] if len(encoders) == 1 else ["lora_te1_", "lora_te2_"]
        out = []
        for i, ((_, transformer), prefix) in enumerate(zip(encoders, prefixes)):
            for path, m in transformer.named_modules():
                if isinstance(m, torch.nn.Linear) and path.startswith("text_model.encoder.layers."):
                    out.append(AdaptTarget(prefix + path.replace(".", "_"), f"te{i + 1}", path, m))
        return out

    def parameters(self):
        return super().parameters() + [p for _, t in self._text_encoders() for p in t.parameters()]

    def encode_text(self, prompts) -> Cond:
        if not torch.is_grad_enabled():
            return self._encode(prompts)
        self.clip.load_model()  # the text encoder's deltas train: gradients flow back through CLIP
        transformers = [t for _, t in self._text_encoders()]
        for transformer in transformers:
            _trainable_weights(transformer)
        with _norms_read_copies(transformers):
            return self._encode(prompts)

    def _encode(self, prompts) -> Cond:
        tokens = [self.clip.tokenize(p) for p in prompts]
        if not self.is_sdxl and all(_plain(t) for t in tokens):
            return {"context": self._encode_together(tokens).to(self.device)}
        ctx, pooled = [], []
        for t in tokens:
            c, pl = self.clip.encode_from_tokens(t, return_pooled=True)
            ctx.append(c[:, :CONTEXT_TOKENS].float())
            pooled.append(pl.float() if pl is not None else None)
        cond = {"context": torch.cat(ctx).to(self.device)}
        if self.is_sdxl:
            r = self.resolution
            cond["y"] = torch.cat([self.base.encode_adm(pooled_output=p, width=r, height=r, target_width=r,
                                                        target_height=r) for p in pooled]).float().to(self.device)
        return cond

    def _encode_together(self, tokens) -> torch.Tensor:
        """Plain prompts in one pass through CLIP. ComfyUI encodes a long prompt's 77-token chunks as one batch,
        each on its own, and joins them along the tokens; so the prompts' first chunks given together come back
        as [1, 77·n, D], each what the prompt alone gives in its first 77 tokens, where the engine cuts every
        prompt. (The pooled output is the first chunk's only: SDXL, which needs every prompt's, goes one by one.)"""
        merged = {k: [t[k][0] for t in tokens] for k in tokens[0]}
        context = self.clip.encode_from_tokens(merged).float()
        return context.reshape(len(tokens), -1, context.shape[-1])[:, :CONTEXT_TOKENS]

    def vocabulary(self):
        """The first text encoder's whole-word tokens and input embeddings, from ComfyUI's own CLIP objects
        (`clip.tokenizer.clip_l.tokenizer` is a transformers CLIPTokenizer, clip_h for SD 2.x; the encoder's
        `transformer.get_input_embeddings()` its token table). None where a text encoder is built otherwise:
        the run then skips the search for synonyms and neighbours."""
        encoders = self._text_encoders()
        try:
            name, transformer = encoders[0]
            tok = getattr(self.clip.tokenizer, name).tokenizer
            table = transformer.get_input_embeddings().weight
        except (AttributeError, IndexError):
            return None
        return whole_word_vocabulary(tok, table)

    def encode_images(self, pixels):
        x = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # ComfyUI IMAGE: BHWC in [0, 1]
        return self.latent_format.process_in(self.vae.encode(x).float()).to(self.device)

    def decode_latents(self, latents):
        img = self.vae.decode(self.latent_format.process_out(latents.float().cpu()))
        img = img.reshape(-1, *img.shape[-3:])  # some VAEs add a frame dimension
        return img.permute(0, 3, 1, 2).float().clamp(0, 1)

    # encoder_modules: none. ComfyUI's model management already moves CLIP and the VAE off the
    # GPU when the UNet needs the memory.
