"""Write diffusers models as one single-file checkpoint in the original LDM/CompVis key layout.

The test-side writer for single-file loading, kept independent of the loader (which uses diffusers'
LDM → diffusers converters): the maps follow diffusers' scripts/convert_diffusers_to_original_
stable_diffusion.py and convert_diffusers_to_original_sdxl.py, generalised from SD's fixed 4 levels
× 2 blocks to any number of levels and blocks, so tiny models can be written.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_prefixes(cfg) -> List[Tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of a UNet2DConditionModel config."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    k = 1
    for i in range(levels):
        for j in range(n):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.")]
            k += 1
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
            k += 1
    k = 0
    for i in range(levels):
        for j in range(n + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.")]
            k += 1
        if i < levels - 1:  # the upsampler follows the last block's attention, if it has one
            slot = 2 if cfg.up_block_types[i].startswith("CrossAttn") else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k - 1}.{slot}."))
    return pairs


def _rename(key: str, pairs) -> str:
    for hf, ldm in pairs:
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".resnets." in hf:
                for a, b in RESNET:
                    rest = rest.replace(a, b)
            return ldm + rest
    return key


def unet_to_ldm(unet) -> Dict[str, torch.Tensor]:
    pairs = _unet_prefixes(unet.config)
    return {"model.diffusion_model." + _rename(k, pairs): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> Dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    pairs = [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
             ("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    for i in range(levels):
        pairs += [(f"down_blocks.{i}.resnets.", f"down.{i}.block."),
                  (f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                  (f"up_blocks.{i}.resnets.", f"up.{levels - 1 - i}.block."),  # LDM numbers up blocks from the bottom
                  (f"up_blocks.{i}.upsamplers.0.", f"up.{levels - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for k, v in vae.state_dict().items():
        half, rest = k.split(".", 1) if k.startswith(("encoder.", "decoder.")) else ("", k)
        for hf, ldm in pairs:
            if rest.startswith(hf):
                rest = ldm + rest[len(hf):]
                break
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in rest:
            for a, b in attn:
                rest = rest.replace(".attn_1." + a, ".attn_1." + b)
            if v.dim() == 2:
                v = v[:, :, None, None]  # LDM's VAE attention uses 1×1 convs
        out["first_stage_model." + (f"{half}.{rest}" if half else rest)] = v
    return out


def clip_to_ldm(text_encoder, prefix: str) -> Dict[str, torch.Tensor]:
    """CLIP-L in the transformers layout, as SD 1.x and SDXL's first embedder store it."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


OPEN_CLIP = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def open_clip_to_ldm(text_encoder, prefix: str, unused_last_block: bool = False) -> Dict[str, torch.Tensor]:
    """An OpenCLIP text tower (SD 2.x's ViT-H, SDXL's bigG). With unused_last_block, one more random
    block and a text projection are written, as SD 2.x files hold the whole tower but use its
    penultimate layer."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    n = text_encoder.config.num_hidden_layers
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{c}_proj.{p}") for c in "qkv"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(qkv)
        for k in [k for k in sd if k.startswith(src)]:
            rest = k[len(src):]
            for a, b in OPEN_CLIP:
                rest = rest.replace(a, b)
            out[dst + rest] = sd.pop(k)
    assert not sd, sorted(sd)
    if unused_last_block:
        g = torch.Generator().manual_seed(1)
        template = {k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): v for k, v in out.items()
                    if f"resblocks.{n - 1}." in k}
        out.update({k: torch.randn(v.shape, generator=g) for k, v in template.items()})
        hidden = text_encoder.config.hidden_size
        out[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    return out


def save_checkpoint(path, parts: Dict[str, torch.Tensor], metadata=None) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in parts.items()}, str(path), metadata=metadata)
