"""Stable Diffusion-shaped models with random weights, built in code, for speed measurements.

- sd15_shallow: SD 1.5's widths and attention, two levels deep (ComfyUI detects it as SD15, which
  checks widths and context, not depth: 320/640 channels, one resnet and one transformer per level,
  context 768; ~107 M UNet parameters), full CLIP-L text encoder and SD VAE shapes. Small enough for
  a CPU step, real enough for per-layer costs.
- sd15 / sdxl: the full-size UNets (860 M / 2.6 B parameters) for `--gpu-full`.
- tiny: the same code path at test size.
Weights are random: time and memory do not depend on them. Tokenizers use the mini world's
vocabulary (nothing is downloaded).
"""

from __future__ import annotations

import tempfile

import torch

from miniworld import dataset
from miniworld.tokenizer import write_clip_tokenizer
from vdu_engine import DiffusersBackend

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
UNETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
    "sd15_shallow": dict(SD15_UNET, block_out_channels=(320, 640), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
    "sd15": SD15_UNET,
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128),
}
# (hidden, layers, heads, intermediate, projection) of CLIP-L, OpenCLIP-G, and a test-size one
TEXT = {"L": (768, 12, 12, 3072, 768), "G": (1280, 32, 20, 5120, 1280), "tiny": (32, 2, 2, 64, 32)}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon")


def _text_encoder(kind: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    hidden, layers, heads, inter, proj = TEXT[kind]
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, projection_dim=proj, max_position_embeddings=77,
                         hidden_act="gelu" if kind == "G" else "quick_gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build(kind: str, device="cpu", seed: int = 0) -> DiffusersBackend:
    """A DiffusersBackend over random weights of the named shape (float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **UNETS[kind])
    if kind == "tiny":
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
        encoders = [_text_encoder("tiny", False)]
    else:  # SD's VAE: 128/256/512/512 channels, 8× down
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            scaling_factor=0.18215)
        encoders = [_text_encoder("L", False)] + ([_text_encoder("G", True)] if kind == "sdxl" else [])
    from transformers import CLIPTokenizer
    folder = tempfile.mkdtemp(prefix="vdu-tok-")
    write_clip_tokenizer(folder, dataset.vocabulary(), max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder)
    return DiffusersBackend(unet, vae, encoders, [tok] * len(encoders), dict(SCHEDULER), device=device)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
