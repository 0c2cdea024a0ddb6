"""A small SD 1.5-shaped single-file checkpoint for the WebUI tests, and the CLIP files A1111 reads.

SD 1.5's widths and layout with fewer levels (seeded random weights): UNet model_channels 320,
channel_mult [1, 2], 2 res blocks per level (A1111's LoRA key conversion assumes SD 1.5's 2),
cross-attention (context 768, 8 heads) at the first level only, as SD 1.5's deepest level has none
(so every A1111 key formula holds, samplers included); the full CLIP-L text encoder and SD VAE.

Two builders give the same LDM key layout: `with_ldm` from Stability's ldm classes (A1111's
venv) with the .yaml beside it that A1111 reads for an unknown layout, `with_diffusers` from
diffusers classes and Forge's own diffusers → LDM maps (Forge's venv; Forge guesses the layout).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[1],
            num_res_blocks=2, channel_mult=[1, 2], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)
CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "vdu_engine" / "assets" / "clip_tokenizer"
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def _signal(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ldm and diffusers zero-initialise output convs: give every all-zero weight some signal, so
    outputs and gradients vary as in a trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _text_encoder():
    """CLIP-L with random weights. Its biases get signal too: a fresh CLIPTextModel's are zeros, so its final layer
    norm's output has zero mean, and the WebUIs' emphasis normalisation, z · mean(z) / mean(z · w), then divides
    0 by 0 for some prompt batches in fp16 (Forge keeps CLIP in fp16 even on the CPU), which a trained CLIP's
    biases never let happen."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return _signal(CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed=1)


def _text_sd(text) -> dict:
    out = {}
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        out[f"cond_stage_model.transformer.{k}"] = v
    return out


def with_ldm(path: Path, a1111: Path, seed: int = 0) -> Path:
    """Checkpoint + its .yaml (A1111's v1-inference.yaml with this UNet), from ldm's classes."""
    import yaml
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    unet = _signal(UNetModel(**UNET), seed)
    vae = AutoencoderKL(ddconfig=VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd.update(_text_sd(_text_encoder()))
    _save(sd, path)
    config = yaml.safe_load((a1111 / "configs" / "v1-inference.yaml").read_text())
    config["model"]["params"]["unet_config"]["params"] = UNET
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    return path


def with_diffusers(path: Path, seed: int = 0) -> Path:
    """The same layout from diffusers classes, converted by Forge's maps (Forge's venv)."""
    from backend.misc.diffusers_state_dict import unet_to_diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from huggingface_guess.diffusers_convert import convert_vae_state_dict
    torch.manual_seed(seed)
    unet = _signal(UNet2DConditionModel(
        sample_size=32, block_out_channels=(320, 640), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8), seed)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    config = {"num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [1, 1, 0, 0],
              "transformer_depth_output": [1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
    ldm_name = unet_to_diffusers(config)
    sd = {f"model.diffusion_model.{ldm_name[k]}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in convert_vae_state_dict(vae.state_dict()).items()})
    sd.update(_text_sd(_text_encoder()))
    return _save(sd, path)


def _save(sd: dict, path: Path) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def clip_l_hub_cache(hf_home: Path) -> Path:
    """The files A1111's FrozenCLIPEmbedder asks the hub for (openai/clip-vit-large-patch14: config
    and tokenizer; the weights come from the checkpoint), as a hub cache snapshot, so that
    HF_HUB_OFFLINE=1 finds them. The vocabulary is the CLIP BPE list the engine ships."""
    repo = hf_home / "hub" / "models--openai--clip-vit-large-patch14"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    if (snap / "vocab.json").exists():
        return snap
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_TOKENIZER / name, snap / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (snap / "special_tokens_map.json").write_text(json.dumps(special))
    (snap / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                            "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    text = {**CLIP_L, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    (snap / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 768, "text_config": text,
                                                  "vision_config": {}}))
    return snap
