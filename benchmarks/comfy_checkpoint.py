"""A small SD 1.5-shaped single-file checkpoint that ComfyUI detects as SD15 (its
`supported_models.SD15` matches context 768, 320 channels, no linear proj_in, no adm; depth is not checked).

Built with diffusers classes (seeded random weights): a shallow UNet (model_channels 320,
channel_mult [1, 2], one res block and one transformer per level, context 768), a full-size
CLIP-L text encoder and SD VAE, converted to the original LDM key layout that checkpoint loaders
read. Needs ComfyUI importable (for its diffusers → LDM maps), i.e. runs in the comfy venv.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_COMFY_CONFIG = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
                     "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1}


def build_diffusers_parts(seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(320, 640), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    with torch.no_grad():  # diffusers zero-initialises out convs; give them signal so outputs vary
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet, vae, text


def to_ldm_state_dict(unet, vae, text) -> dict:
    import comfy.diffusers_convert
    import comfy.utils
    unet_map = comfy.utils.unet_to_diffusers(UNET_COMFY_CONFIG)
    sd = {f"model.diffusion_model.{unet_map[k]}": v for k, v in unet.state_dict().items()}
    vae_sd = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    sd.update({f"first_stage_model.{k}": v for k, v in vae_sd.items()})
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        sd[f"cond_stage_model.transformer.{k}"] = v
    return {k: v.contiguous() for k, v in sd.items()}


def write_checkpoint(path: Path, seed: int = 0):
    """Write the checkpoint and return the diffusers UNet that holds the same weights."""
    from safetensors.torch import save_file
    unet, vae, text = build_diffusers_parts(seed)
    save_file(to_ldm_state_dict(unet, vae, text), str(path))
    return unet
