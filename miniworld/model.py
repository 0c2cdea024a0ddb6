"""The mini Stable Diffusion: the same diffusers classes as SD 1.x, in tiny configs.

32×32 images ↔ 4×8×8 latents (a 3-level KL VAE), a 2-level UNet with cross-attention at both
levels, and a 2-layer CLIP text encoder over the world's own vocabulary.
"""

from __future__ import annotations

import torch

from .dataset import vocabulary

MAX_TOKENS = 16


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=32)


def build_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def build_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["build_vae", "build_unet", "build_text_encoder", "build_scheduler", "param_count", "vocabulary",
           "MAX_TOKENS"]
