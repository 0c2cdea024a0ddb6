"""Single-file Stable Diffusion checkpoints (the LDM/CompVis layout that ComfyUI, the WebUI and kohya
write) read into diffusers modules with nothing downloaded: SD 1.x, SD 2.x (v-prediction too), SDXL.

Phases: read the state dict → refuse what is not an SD 1.x/2.x/XL text-to-image checkpoint → tell the
family from its text encoder keys → infer each part's config from the weights' shapes → convert the
keys with diffusers' own converters and load them strictly → tokenizers from the CLIP vocabulary that
ships in assets/ → prediction type → scheduler config.

What the weights cannot tell is each family's convention, said where it is used: attention heads,
GroupNorm groups, activations, VAE scaling, the native resolution and the noise schedule.
"""

from __future__ import annotations

import contextlib
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import VDUError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L_SD1, OPENCLIP_SD2 = "cond_stage_model.transformer.", "cond_stage_model.model."
CLIP_L_XL, OPENCLIP_XL = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
PREDICTION_TYPES = ("epsilon", "v_prediction")
FIX_CONFIG = "pass --config-dir DIR, a diffusers folder of the same architecture"

# Conventions per family (the weights do not record them). Native size: SD 2.x's 768-v models are
# the v-prediction ones, SD 2.x-base (epsilon) is 512. VAE scaling: SD's and SDXL's published values.
NATIVE_PX = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Keys of architectures that are not SD 1.x/2.x/XL, as their LDM/ComfyUI files name them.
OTHER_ARCHITECTURES = [
    ("joint_blocks.", "Stable Diffusion 3"), ("double_blocks.", "Flux"), ("single_stream_modulation", "Flux 2"),
    ("double_layers.", "AuraFlow"), ("cap_embedder.", "Lumina 2"), ("head.modulation", "Wan"),
    ("patchify_proj.", "LTX-Video"), ("blocks.0.attn.qkv_x.", "Mochi"), ("x_embedder.", "a DiT (PixArt, Hunyuan...)"),
    ("control_model.", "ControlNet"), ("clip_txt_mapper.", "Stable Cascade"),
    ("motion_modules.", "AnimateDiff motion module"), ("edm_mean", "Playground v2.5 (EDM-trained)"),
]


@dataclass
class SingleFileModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    tokenizers: List
    scheduler_config: dict
    family: str  # "sd1", "sd2", "sdxl"


def load_single_file(path, prediction_type: Optional[str] = None, trust_pickle: bool = False,
                     dtype: Optional[torch.dtype] = None) -> SingleFileModel:
    """The parts of a single-file checkpoint as diffusers/transformers modules (on the CPU).

    prediction_type: "epsilon" or "v_prediction" overrides detection. trust_pickle: allow a .ckpt
    (a pickle can run code when loaded). dtype: None keeps each part's stored dtype."""
    path = Path(path)
    sd, metadata = read_checkpoint(path, trust_pickle)
    name = path.name
    refuse_non_models(sd, name)
    family = family_of(sd, name)
    try:
        return _assemble(sd, metadata, family, prediction_type, dtype, name)
    except KeyError as e:  # a weight the family's layout has is not in the file
        raise VDUError(f"{name} lacks {e.args[0]}, which an {FAMILY_NAMES[family]} checkpoint holds; "
                       f"{FIX_CONFIG}") from None


def _assemble(sd, metadata: dict, family: str, prediction_type: Optional[str], dtype, name: str) -> SingleFileModel:
    unet = _build_unet(sd, family, dtype, name)
    pred = prediction_type or _stored_prediction_type(sd, metadata)
    if pred is None:
        # SD 2.x came as 512-epsilon and 768-v models with the same architecture; the others are epsilon.
        pred = ("v_prediction" if looks_v_prediction(unet) else "epsilon") if family == "sd2" else "epsilon"
    native = NATIVE_PX["sd2-v" if family == "sd2" and pred == "v_prediction" else family]
    vae = _build_vae(sd, family, native, dtype, name)
    unet.register_to_config(sample_size=native // 2 ** (len(vae.config.block_out_channels) - 1))
    text_encoders, tokenizers = _build_text(sd, family, dtype, name)
    # ComfyUI marks zero-terminal-SNR models with a "ztsnr" key, as it marks v-prediction with "v_pred".
    return SingleFileModel(unet, vae, text_encoders, tokenizers, scheduler_config(pred, "ztsnr" in sd), family)


# --- reading --------------------------------------------------------------------------------------
def refuse_pickle(path: Path, trust_pickle: bool) -> None:
    if path.suffix.lower() == ".ckpt" and not trust_pickle:
        raise VDUError(f"{path.name} is a pickle (.ckpt), which can run code when loaded; convert it to "
                       ".safetensors, or pass --trust-pickle (trust_pickle=True) if you trust its source")


def read_checkpoint(path: Path, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, safetensors metadata) of a .safetensors or, when trusted, a .ckpt file."""
    refuse_pickle(path, trust_pickle)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        return _read_pickle(path), {}
    except VDUError:
        raise
    except Exception as e:  # safetensors, zipfile and pickle each raise their own types
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise VDUError(f"{path.name} could not be read as a checkpoint ({type(e).__name__}: {detail}); "
                       "check that it downloaded completely and is a .safetensors or .ckpt model") from None


def _read_pickle(path: Path) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Old training checkpoints pickle extra objects (Lightning callbacks); the user vouched for the file.
        sd = torch.load(str(path), map_location="cpu", weights_only=False)
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise VDUError(f"{path.name} holds a {type(sd).__name__}, not a state dict; pass a Stable Diffusion checkpoint")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# --- what the file is -----------------------------------------------------------------------------
def refuse_non_models(sd: Dict[str, torch.Tensor], name: str) -> None:
    """One line naming what the file is and what to pass instead, for anything but a full SD checkpoint."""
    keys = list(sd)
    lora = ("lora_A", "lora.down", ".lora_", ".hada_w", ".lokr_w")  # kohya, PEFT, diffusers, LyCORIS keys
    if any(k.startswith("lora_") or any(m in k for m in lora) for k in keys):
        raise VDUError(f"{name} is a LoRA, not a model; pass the checkpoint it was trained on as the model")
    if "emb_params" in sd or "string_to_param" in sd or (keys and set(keys) <= {"clip_l", "clip_g"}):
        raise VDUError(f"{name} is a textual-inversion embedding, not a model; pass a Stable Diffusion checkpoint")
    for marker, arch in OTHER_ARCHITECTURES:
        if any(marker in k for k in keys):
            raise VDUError(f"{name} is a {arch} checkpoint; vdu-unlearn handles SD 1.x, SD 2.x and SDXL, "
                           "so pass one of those")
    has_unet = UNET + "input_blocks.0.0.weight" in sd
    has_vae = VAE + "encoder.conv_in.weight" in sd
    has_text = any(k.startswith(("cond_stage_model.", "conditioner.")) for k in keys)
    if not has_unet:
        _refuse_partial(sd, name, has_vae, has_text)
    if not (has_vae and has_text):
        missing = " and ".join(p for p, ok in (("VAE", has_vae), ("text encoder", has_text)) if not ok)
        raise VDUError(f"{name} holds a UNet without its {missing}; pass a full checkpoint (UNet, VAE and "
                       "text encoder in one file) or a diffusers folder")
    _refuse_other_unets(sd, name)


def _refuse_partial(sd, name: str, has_vae: bool, has_text: bool) -> None:
    if any(k.startswith("down_blocks.") or k.startswith("input_blocks.") for k in sd):
        what = "only a UNet"
    elif has_vae or any(k.startswith(("encoder.", "decoder.")) for k in sd):
        what = "only a VAE"
    elif has_text or any("text_model." in k or "resblocks." in k for k in sd):
        what = "only a text encoder"
    else:
        raise VDUError(f"{name} is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights); "
                       "pass an SD 1.x/2.x/XL checkpoint or a diffusers folder")
    raise VDUError(f"{name} holds {what}; pass a full checkpoint (UNet, VAE and text encoder in one file) "
                   "or a diffusers folder")


def _refuse_other_unets(sd, name: str) -> None:
    channels = sd[UNET + "input_blocks.0.0.weight"].shape[1]
    if channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(channels, "not a text-to-image model")
        raise VDUError(f"{name} is {kind} (its UNet takes {channels} input channels, not 4); pass the "
                       "text-to-image checkpoint it was made from")
    if "conditioner.embedders.0.model.token_embedding.weight" in sd:
        raise VDUError(f"{name} is an SDXL refiner; pass the SDXL base model or a model fine-tuned from it")
    if UNET + "label_emb.0.0.weight" in sd and OPENCLIP_XL + "token_embedding.weight" not in sd:
        raise VDUError(f"{name} is a class-conditioned SD model (unCLIP or an upscaler), not text-to-image; "
                       "pass an SD 1.x/2.x/XL text-to-image checkpoint")


def family_of(sd, name: str) -> str:
    """SD 1.x: CLIP-L; SD 2.x: OpenCLIP ViT-H; SDXL: both CLIP-L and OpenCLIP bigG, as "embedders"."""
    if OPENCLIP_XL + "token_embedding.weight" in sd and any(k.startswith(CLIP_L_XL) for k in sd):
        return "sdxl"
    if OPENCLIP_SD2 + "token_embedding.weight" in sd:
        return "sd2"
    if any(k.startswith(CLIP_L_SD1) and k.endswith("token_embedding.weight") for k in sd):
        return "sd1"
    raise VDUError(f"{name} has a UNet but no text encoder of SD 1.x, 2.x or XL; {FIX_CONFIG}")


# --- configs from shapes --------------------------------------------------------------------------
def _count(keys, prefix: str) -> int:
    """How many numbered children `prefix` has (1 + the largest index after it), 0 for none."""
    found = [int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)
             and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(found) + 1 if found else 0


def _unet_levels(u) -> List[List[Tuple[int, int]]]:
    """(width, transformer depth) of each down-path resnet, grouped by resolution level."""
    levels, i = [[]], 1
    while f"input_blocks.{i}.0.op.weight" in u or f"input_blocks.{i}.0.in_layers.2.weight" in u:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])  # a downsampler ends a level
        else:
            width = u[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]
            levels[-1].append((width, _count(u, f"input_blocks.{i}.1.transformer_blocks.")))
        i += 1
    return levels


def unet_config(u: Dict[str, torch.Tensor], family: str, name: str) -> dict:
    """A UNet2DConditionModel config from LDM UNet weights (keys without the model.diffusion_model. prefix)."""
    levels = _unet_levels(u)
    n = len(levels[0])
    if not n or any(len(lv) != n or len({w for w, _ in lv}) != 1 for lv in levels):
        sizes = [len(lv) for lv in levels]
        raise VDUError(f"{name} has an unusual UNet layout (levels of {sizes} blocks); {FIX_CONFIG}")
    widths, depths = [lv[0][0] for lv in levels], [max(d for _, d in lv) for lv in levels]
    up_cross = [any(f"output_blocks.{k}.1.proj_in.weight" in u for k in range(i * (n + 1), (i + 1) * (n + 1)))
                for i in range(len(levels))]
    attn = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in u.items() if k.endswith(".proj_in.weight")), None)
    if attn is None or proj_in is None:
        raise VDUError(f"{name} has a UNet without cross-attention; {FIX_CONFIG}")
    layers = [d or 1 for d in depths]  # a level without attention ignores its depth; 1 as in diffusers' configs
    cfg = dict(
        in_channels=u["input_blocks.0.0.weight"].shape[1], out_channels=u["out.2.weight"].shape[0],
        block_out_channels=widths, layers_per_block=n,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in up_cross],
        transformer_layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        cross_attention_dim=attn.shape[1], use_linear_projection=proj_in.dim() == 2,  # Linear, not a 1×1 conv
        # Heads are not in the weights. SD 1.x: 8 heads in every block; SD 2.x and SDXL: heads of 64
        # channels. diffusers' `attention_head_dim` holds the number of heads (a historical misnomer).
        attention_head_dim=8 if family == "sd1" else [max(1, w // 64) for w in widths],
        norm_num_groups=32,  # GroupNorm groups: 32 in every SD model; not recorded in the weights
        upcast_attention=family == "sd2",  # SD 2.x overflows fp16 attention (as diffusers' SD 2.1 config)
    )
    if u["time_embed.0.weight"].shape[0] != 4 * widths[0]:
        cfg["time_embedding_dim"] = u["time_embed.0.weight"].shape[0]
    return cfg


def _sdxl_additions(u, sd) -> dict:
    """SDXL's "text_time" input: the pooled text embedding and 6 size/crop numbers, each embedded."""
    adm = u["label_emb.0.0.weight"].shape[1]
    pooled = sd[OPENCLIP_XL + "text_projection"].shape[1]
    return dict(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                projection_class_embeddings_input_dim=adm)


def vae_config(v: Dict[str, torch.Tensor], family: str, native_px: int) -> dict:
    """An AutoencoderKL config from LDM VAE weights (keys without the first_stage_model. prefix)."""
    n_levels = _count(v, "encoder.down.")
    cfg = dict(
        in_channels=v["encoder.conv_in.weight"].shape[1], out_channels=v["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * n_levels, up_block_types=["UpDecoderBlock2D"] * n_levels,
        block_out_channels=[v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n_levels)],
        layers_per_block=_count(v, "encoder.down.0.block."),
        latent_channels=v["encoder.conv_out.weight"].shape[0] // 2,  # the encoder outputs mean and log-variance
        norm_num_groups=32, sample_size=native_px, scaling_factor=VAE_SCALING[family],
    )
    if "quant_conv.weight" not in v:
        cfg.update(use_quant_conv=False, use_post_quant_conv=False)
    if "encoder.mid.attn_1.q.weight" not in v:
        cfg["mid_block_add_attention"] = False
    return cfg


def text_config(sd, prefix: str, openclip: bool, pad_id: int, projection: bool = False):
    """A CLIPTextConfig from the weights of a CLIP-L (transformers layout) or OpenCLIP text tower."""
    from transformers import CLIPTextConfig
    if openclip:
        tok, pos = sd[prefix + "token_embedding.weight"], sd[prefix + "positional_embedding"]
        layers = _count(sd, prefix + "transformer.resblocks.")
        inter = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    else:
        t = prefix + "text_model."
        tok, pos = sd[t + "embeddings.token_embedding.weight"], sd[t + "embeddings.position_embedding.weight"]
        layers, inter = _count(sd, t + "encoder.layers."), sd[t + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    hidden = tok.shape[1]
    proj = sd[prefix + "text_projection"].shape[1] if projection else hidden
    # Not in the weights: heads of 64 channels, and the activation each tower was trained with
    # (OpenAI's CLIP-L: quick_gelu; OpenCLIP ViT-H and bigG: gelu).
    return CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=pos.shape[0], projection_dim=proj,
                          hidden_act="gelu" if openclip else "quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id)


def scheduler_config(prediction_type: str, zero_terminal_snr: bool = False) -> dict:
    """The schedule every SD 1.x/2.x/XL model was trained with: scaled-linear betas 0.00085..0.012, 1000 steps."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "rescale_betas_zero_snr": zero_terminal_snr}


# --- prediction type ------------------------------------------------------------------------------
def _stored_prediction_type(sd, metadata: dict) -> Optional[str]:
    """What the file says: ComfyUI's `v_pred` key, or the ModelSpec metadata kohya and others write."""
    if "v_pred" in sd:
        return "v_prediction"
    spec = str(metadata.get("modelspec.prediction_type", "")).strip().lower().replace("-", "_")
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(spec)


@torch.no_grad()
def looks_v_prediction(unet) -> bool:
    """The WebUI's test for SD 2.x (AUTOMATIC1111 stable-diffusion-webui, modules/sd_models_config.py,
    is_using_v_parameterization_for_sd2), on a diffusers UNet: at t=999 the input is almost pure noise,
    so an epsilon model returns about its input, while a v model returns about -x0, well below it.
    The WebUI's input (constants 0.5, 8×8 latents, 2 context tokens) and threshold (mean < -1)."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999], device=p.device)
    out = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
    return (out.float() - x.float()).mean().item() < -1


# --- building the parts ---------------------------------------------------------------------------
def _empty_init():
    """Parameters on the meta device while a model is built (no random init of weights about to be
    replaced); buffers stay real. accelerate is optional: without it the models init normally."""
    try:
        from accelerate import init_empty_weights
        return init_empty_weights()
    except ImportError:
        return contextlib.nullcontext()


def _part_dtype(weights, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    stored = Counter(v.dtype for v in weights.values() if v.is_floating_point()).most_common(1)[0][0]
    # fp8 stores widen exactly to fp16; anything else unusual is computed in fp32.
    if stored in (torch.float32, torch.float16, torch.bfloat16):
        return stored
    return torch.float16 if "float8" in str(stored) else torch.float32


def _fill(model, weights: Dict[str, torch.Tensor], dtype, part: str, family: str, name: str):
    """Load converted weights into a model built on the meta device, strictly: every parameter is
    filled and every weight is used, or a one-line error names a few of those that do not fit."""
    dt = _part_dtype(weights, dtype)
    weights = {k: v.to(dt) if v.is_floating_point() else v for k, v in weights.items()}
    where = f"{name} does not fit an {FAMILY_NAMES[family]} {part}"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise VDUError(f"{where} ({detail[:160]}); {FIX_CONFIG}") from None
    if missing or unexpected:
        few = lambda ks: ", ".join(ks[:3]) + (f" and {len(ks) - 3} more" if len(ks) > 3 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else ""]
        raise VDUError(f"{where} ({'; '.join(p for p in parts if p)}); {FIX_CONFIG}")
    return model.eval()


def _build_unet(sd, family: str, dtype, name: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    u = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
    cfg = unet_config(u, family, name)
    if family == "sdxl":
        cfg.update(_sdxl_additions(u, sd))
    with _empty_init():
        unet = UNet2DConditionModel(**cfg)
    weights = convert_ldm_unet_checkpoint({UNET + k: v for k, v in u.items()}, cfg)
    return _fill(unet, weights, dtype, "UNet", family, name)


def _build_vae(sd, family: str, native_px: int, dtype, name: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    v = {k[len(VAE):]: t for k, t in sd.items() if k.startswith(VAE)}
    cfg = vae_config(v, family, native_px)
    with _empty_init():
        vae = AutoencoderKL(**cfg)
    weights = convert_ldm_vae_checkpoint({VAE + k: t for k, t in v.items()}, cfg)
    return _fill(vae, weights, dtype, "VAE", family, name)


def _clip_l(sd, prefix: str, family: str, dtype, name: str):
    """OpenAI CLIP-L, stored in the transformers layout under `prefix`."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel
    # Files saved with transformers < 4.22 lack the `text_model.` level; position_ids are a derived
    # buffer that some files hold (and some hold corrupted), so they are rebuilt rather than read.
    sub = {prefix + "text_model." + k[len(prefix):].removeprefix("text_model."): v for k, v in sd.items()
           if k.startswith(prefix) and not k.endswith("position_ids")}
    with _empty_init():
        model = CLIPTextModel(text_config(sub, prefix, openclip=False, pad_id=49407))
    weights = _flatten_text_model(model, convert_ldm_clip_checkpoint(sub))  # it knows both CLIP-L prefixes
    return _fill(model, weights, dtype, "text encoder (CLIP-L)", family, name)


def _open_clip(sd, prefix: str, family: str, dtype, name: str):
    """OpenCLIP ViT-H (SD 2.x) or bigG (SDXL, with its projection for the pooled embedding)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    sub = {k: v for k, v in sd.items() if k.startswith(prefix)}
    if family == "sd2":
        sub = _penultimate(sub, prefix)
    cfg = text_config(sub, prefix, openclip=True, pad_id=0, projection=family == "sdxl")
    with _empty_init():
        model = (CLIPTextModelWithProjection if family == "sdxl" else CLIPTextModel)(cfg)
    weights = _flatten_text_model(model, convert_open_clip_checkpoint(model, sub, prefix=prefix))
    return _fill(model, weights, dtype, "text encoder (OpenCLIP)", family, name)


def _penultimate(sub, prefix: str):
    """SD 2.x conditions on OpenCLIP's penultimate layer (the LDM config's layer="penultimate", then
    ln_final). As in diffusers' SD 2 config (23 of ViT-H's 24 layers), the last block is dropped, so
    the model's last hidden state is what SD 2.x sees. Files holding the whole tower (the original
    release, ComfyUI and kohya saves: 24 blocks and text_projection) lose their last block; files
    written by diffusers' own converter already stop at the penultimate one."""
    blocks = _count(sub, prefix + "transformer.resblocks.")
    if prefix + "text_projection" not in sub and blocks != 24:
        return sub
    last = f"{prefix}transformer.resblocks.{blocks - 1}."
    return {k: v for k, v in sub.items() if not k.startswith(last) and not k.endswith("text_projection")}


def _flatten_text_model(model, weights):
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level (CLIPTextModelWithProjection keeps it).
    return weights if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in weights.items()}


def _build_text(sd, family: str, dtype, name: str):
    if family == "sd1":
        encoders, pads = [_clip_l(sd, CLIP_L_SD1, family, dtype, name)], ["<|endoftext|>"]
    elif family == "sd2":
        encoders, pads = [_open_clip(sd, OPENCLIP_SD2, family, dtype, name)], ["!"]
    else:
        encoders = [_clip_l(sd, CLIP_L_XL, family, dtype, name), _open_clip(sd, OPENCLIP_XL, family, dtype, name)]
        pads = ["<|endoftext|>", "!"]
    return encoders, [clip_tokenizer(p, te.config.max_position_embeddings) for p, te in zip(pads, encoders)]


def clip_tokenizer(pad_token: str, max_length: int = 77):
    """CLIP's BPE tokenizer (49408 tokens) from assets/. SD 1.x pads with <|endoftext|>; the OpenCLIP
    encoders of SD 2.x and SDXL pad with "!" (id 0), as Stability AI's diffusers tokenizer configs do."""
    from transformers import CLIPTokenizer
    if not (TOKENIZER_DIR / "vocab.json").is_file():
        raise VDUError(f"the CLIP tokenizer files are missing from {TOKENIZER_DIR}; reinstall vdu-unlearn")
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token, model_max_length=max_length)
