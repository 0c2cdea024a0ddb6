"""What the engine needs from a model, and nothing more.

A backend presents one loaded Stable Diffusion model to the engine: a denoiser, its noise
schedule and prediction type, image and text encoders, and the layers that may be adapted,
each with the kohya LoRA key it maps to. The engine never imports diffusers pipelines or
ComfyUI directly; `diffusers_backend.py` and `nodes/comfy_backend.py` implement this class.

Conventions shared by every backend:
- latents are already multiplied by the VAE scaling factor (what the UNet sees);
- timesteps are integer DDPM indices in [0, num_train_timesteps);
- `Cond` is a dict of tensors batched on dim 0 ("context" always; SDXL adds "pooled" and
  "time_ids"), so the engine can index, repeat and concatenate it without knowing its keys.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from .errors import require_finite

Cond = Dict[str, torch.Tensor]
TEXT_NAN = "the text encoder returned non-finite embeddings (nan/inf) for {bad} of {total} prompts"


def cond_index(cond: Cond, index) -> Cond:
    """Rows `index` of every tensor in a conditioning dict."""
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditioning dicts along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def checked_text(backend: "Backend", prompts: List[str]) -> Cond:
    """`backend.encode_text(prompts)`, stopped with the text encoder's fix if it holds nan/inf (an fp16
    encoder can overflow): caught here, it would surface only later, as a nan loss."""
    return require_finite(backend.encode_text(prompts), TEXT_NAN, backend.fixes["text_encoder"])


def weights_fingerprint(modules: Sequence[nn.Module]) -> str:
    """A cheap identity for a set of weights (names, shapes, sums, first values): different for
    different checkpoints of one architecture, without hashing gigabytes."""
    h = hashlib.sha256()
    for m in modules:
        for name, p in m.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
            h.update(p.flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")  # the UNet parts a LoRA adapts (diffusers names)


def whole_word_vocabulary(tokenizer, table: torch.Tensor):
    """(words, rows of `table`) for a CLIP BPE tokenizer: the tokens that end a word ("red</w>")
    are whole words when they are a single token, which is what the table holds one row for."""
    words, rows = [], []
    for token, i in tokenizer.get_vocab().items():
        if token.endswith("</w>") and i < table.shape[0]:
            words.append(token[:-4])
            rows.append(i)
    return words, table.detach()[torch.tensor(rows, device=table.device)].float().cpu()


@dataclass
class NoiseSchedule:
    """The DDPM forward process of the model and what its network predicts."""

    alphas_cumprod: torch.Tensor  # [T], float32, on CPU
    prediction_type: str  # "epsilon" or "v_prediction"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        a = a.view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε."""
        s, n = self._coefs(t, x0)
        return s * x0 + n * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: ε, or v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0."""
        if self.prediction_type == "epsilon":
            return eps
        s, n = self._coefs(t, x0)
        return s * eps - n * x0

    def pred_to_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε implied by a network output (identity for epsilon models)."""
        if self.prediction_type == "epsilon":
            return pred
        s, n = self._coefs(t, x_t)
        return s * pred + n * x_t


@dataclass
class AdaptTarget:
    """One layer the engine may attach a low-rank delta to."""

    key: str  # kohya LoRA key, e.g. "lora_unet_down_blocks_0_attentions_0_..._attn1_to_q"
    component: str  # "unet", "te1" (CLIP-L / only text encoder) or "te2" (SDXL OpenCLIP-G)
    path: str  # diffusers module path inside that component, e.g. "mid_block.attentions.0..."
    module: nn.Module  # an nn.Linear or nn.Conv2d (subclasses allowed); never modified


class Backend(ABC):
    """A loaded model as the engine sees it. Implementations must not modify the user's model:
    the engine only attaches forward hooks to `AdaptTarget.module`s and removes them after."""

    #: "sd_v1", "sd_v2", "sdxl_base_v1-0" (written as ss_base_model_version)
    base_model_version: str
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype  # dtype the denoiser runs in
    #: default training resolution in pixels (512 for SD1, 768 for SD2-v, 1024 for SDXL)
    resolution: int
    #: a string that identifies the weights (used to key the Fisher cache)
    model_hash: str

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's raw output (ε or v) for noisy latents x_t at timesteps t."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] → scaled latents [B, C, H/f, W/f] (no grad; f = vae_scale_factor)."""

    @abstractmethod
    def encode_text(self, prompts: List[str]) -> Cond:
        """Prompts → conditioning. Called under no_grad unless text-encoder layers are
        adapted, in which case gradients must flow through it."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images [B, 3, H, W] in [0, 1] (no grad)."""

    @abstractmethod
    def targets(self) -> List[AdaptTarget]:
        """Every Linear/Conv2d of the UNet and text encoder(s) a LoRA may adapt."""

    #: pixels per latent cell along each side (8 for every SD VAE)
    vae_scale_factor: int = 8

    #: The fix for each part that can make nan/inf (the errors of `errors.require_finite`), in the
    #: words of the front end that loads the model: these are the `vdu` CLI's. There the VAE and
    #: text encoders run in the model's --dtype (as stored: fp16 for many checkpoints, where the SDXL
    #: VAE overflows); --precision only autocasts the UNet. Read-only: a backend replaces the dict.
    fixes: Dict[str, str] = {
        "vae": "load the model in fp32 (--dtype float32) or use a fixed VAE such as madebyollin/sdxl-vae-fp16-fix",
        "text_encoder": "load the model in fp32 (--dtype float32)",
        "unet": "run the UNet in fp32 (--dtype float32 --precision fp32)",
        "fisher": "run the UNet in fp32 (--dtype float32) or use --prior isotropic",
        "lr": "lower --lr",
    }

    def latent_shape(self, resolution: int) -> tuple:
        f = self.vae_scale_factor
        return (4, resolution // f, resolution // f)

    @abstractmethod
    def parameters(self) -> List[nn.Parameter]:
        """Every weight of the denoiser and text encoder(s). The engine sets requires_grad
        False on them while it trains (so no gradient is computed for frozen weights) and
        restores each flag afterwards."""

    def checkpoint_blocks(self) -> List[nn.Module]:
        """The denoiser's blocks that gradient checkpointing may wrap ([]: not supported)."""
        return []

    def encoder_modules(self) -> List[nn.Module]:
        """Modules needed only before training (VAE, text encoders), which may wait on the CPU
        while the UNet trains ([]: the host application manages where they live)."""
        return []

    def vocabulary(self):
        """(whole words, their token embeddings [V, D]) of the (first) text encoder, for finding the
        words nearest to a concept; None when the backend cannot list them."""
        return None

    def text_length(self) -> int:
        """Tokens the text encoder reads per prompt, start and end included (CLIP: 77)."""
        return 77

    def generate(self, prompts: List[str], seed: int, steps: int = 20, guidance: float = 7.5,
                 resolution: int | None = None) -> torch.Tensor:
        """Sample images [B, 3, H, W] in [0, 1] from the model itself, with the LoRAs the
        engine has attached at the time of the call. The default runs DDIM with classifier-
        free guidance on top of `denoise`; a backend may use its own sampler instead."""
        from .sampling import ddim_sample
        return ddim_sample(self, prompts, seed=seed, steps=steps, guidance=guidance,
                           resolution=resolution or self.resolution)
