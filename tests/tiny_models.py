"""Tiny Stable Diffusion-shaped models, built in code and saved as diffusers folders.

Same classes and layer layout as SD 1.x / SD 2.x-v / SDXL (so LoRA keys, conversions and
loaders behave as on the real models), with widths small enough for a CPU test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from miniworld.tokenizer import write_clip_tokenizer

VOCAB_SIZE = 128  # ≥ the number of tokens write_tokenizer makes
VOCAB_WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "dog", "cat", "the", "on"]


def write_tokenizer(folder: Path) -> None:
    write_clip_tokenizer(folder, VOCAB_WORDS)


def _text_encoder(projection: bool, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_tiny(folder, kind: str = "sd1", seed: int = 0) -> Path:
    """kind: 'sd1' (epsilon), 'sd2v' (v-prediction, 1024-style), 'sdxl' (two encoders, text_time)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    folder = Path(folder)
    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if kind == "sdxl":
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=32 + 6 * 8,
                                    transformer_layers_per_block=(1, 2), use_linear_projection=True)
    else:
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4,
                                    use_linear_projection=(kind == "sd2v"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=64)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
    write_tokenizer(folder / "_tok")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(False),
                                         text_encoder_2=_text_encoder(True, seed=1),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(False), tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    # Random init leaves LoRA-relevant layers well scaled but zero-initialised out convs; give
    # every weight some signal so predictions depend on the prompt and the LoRA.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    pipe.save_pretrained(folder)
    return folder
