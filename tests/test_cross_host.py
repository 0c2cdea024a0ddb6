"""A LoRA made in any host loads, every key of it, in every other: the engine's half (issue 15).

Every host writes kohya keys `lora_unet_<diffusers path>` for the same layers, so the claim is
checked against one committed key list per architecture (tests/lora_keys.py): here, that the list
is what the diffusers backend gives on the full-size model (so it cannot drift) and that diffusers'
own LoRA loading takes every key of it; each host suite checks its backend against the same list
(test_comfy_backend.py, webui/test_a1111.py, webui/test_forge.py) and its own LoRA loader on it.
Full-size models on the meta device: shapes without memory.
"""

import pytest
import torch

from lora_keys import ARCHS, committed_keys, diffusers_backend, format_keys, key_file, kohya_lora, unet_keys


def _missing_and_extra(ours: dict, committed: dict) -> tuple:
    return sorted(set(committed) - set(ours)), sorted(set(ours) - set(committed))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_committed_key_list_is_what_the_diffusers_backend_gives(arch):
    """DiffusersBackend.targets() on the full-size UNet (all layers: what `layers=all` adapts) gives
    exactly the committed keys and weight shapes, and the file is byte-for-byte its rendering, so a
    change to the engine's naming or layer set shows here first (`python tests/lora_keys.py` rewrites it)."""
    ours = unet_keys(diffusers_backend(arch).targets())
    committed = committed_keys(arch)
    assert _missing_and_extra(ours, committed) == ([], [])
    assert ours == committed
    assert key_file(arch).read_text() == format_keys(arch, ours)
    assert all(k.split("_")[2] in ("down", "mid", "up") for k in ours)  # down_blocks, mid_block, up_blocks only
    # what the layer set holds: every attention projection, feed-forward, resnet conv, sampler
    kinds = {"to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out", "conv1",
             "conv2", "time_emb_proj", "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv"}
    assert all(any(k.endswith(kind) for k in ours) for kind in kinds)


def _meta_pipeline(arch: str, unet):
    """A full-size diffusers pipeline on meta around `unet` (text encoders CLIP-L, OpenCLIP-G for SDXL)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from benchmarks.sd_shapes import SCHEDULER, _text_encoder
    from vdu_engine.single_file import clip_tokenizer
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        te = _text_encoder("L", False)
        te2 = _text_encoder("G", True) if arch == "sdxl" else None
    common = dict(vae=vae, text_encoder=te, tokenizer=clip_tokenizer("<|endoftext|>"), unet=unet,
                  scheduler=DDPMScheduler(**SCHEDULER))
    if arch == "sdxl":
        return StableDiffusionXLPipeline(**common, text_encoder_2=te2, tokenizer_2=clip_tokenizer("!"))
    return StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_load_lora_weights_takes_every_committed_key(arch, monkeypatch):
    """A LoRA with every committed key (the engine's own export of the full-size targets, rank 1, zeros
    up) goes through `pipe.load_lora_weights`, diffusers' kohya conversion and peft injection: no key is
    left unconverted (diffusers raises on those), none unexpected or missing in the model, and the UNet
    layers that got a LoRA are exactly the committed ones, each with the committed shape."""
    import diffusers.loaders.peft as dpeft
    backend = diffusers_backend(arch)
    targets = backend.targets()
    committed = committed_keys(arch)
    assert unet_keys(targets) == committed
    lora = kohya_lora(targets)
    assert len(lora) == 3 * len(committed)
    pipe = _meta_pipeline(arch, backend.unet)

    seen = []
    real = dpeft._maybe_warn_for_unhandled_keys
    monkeypatch.setattr(dpeft, "_maybe_warn_for_unhandled_keys", lambda k, name: (seen.append(k), real(k, name)))
    pipe.load_lora_weights(dict(lora), adapter_name="vdu")
    assert len(seen) == 1
    assert not getattr(seen[0], "unexpected_keys", None) and not [
        k for k in getattr(seen[0], "missing_keys", None) or [] if ".lora_" in k]
    loaded = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()
              if hasattr(m, "lora_A") and "vdu" in m.lora_A}
    assert _missing_and_extra(loaded, committed) == ([], [])
    for key, m in loaded.items():
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m.base_layer
        assert tuple(base.weight.shape) == committed[key], key
        assert m.lora_A["vdu"].weight.shape[0] == 1 and m.lora_B["vdu"].weight.shape[0] == committed[key][0], key
