"""Single-file checkpoints in the LDM layout (SD 1.x, SD 2.x-v, SDXL) load with nothing downloaded
and give the same predictions, text embeddings and latents as the diffusers models they were written from."""

import torch
import pytest

from ldm_layout import clip_to_ldm, open_clip_to_ldm, save_checkpoint, unet_to_ldm, vae_to_ldm
from vdu_engine import DiffusersBackend, VDUError
from vdu_engine import single_file
from vdu_engine.single_file import clip_tokenizer, looks_v_prediction

SCALING = {"sd1": 0.18215, "sd2v": 0.18215, "sdxl": 0.13025}


def _text_encoder(kind: str, seed: int, projection: int = 0):
    """vocab 49408 and 77 positions, so the real CLIP tokenizer fits; heads of 64 as in every SD encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, projection_dim=projection or 64,
                         hidden_act="quick_gelu" if kind == "clip" else "gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if kind == "clip" else 0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(kind: str):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    if kind == "sd1":  # conv proj_in, 8 heads, two blocks per level
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=64, attention_head_dim=8)
    elif kind == "sd2v":  # linear proj_in, heads of 64 channels
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True)
    else:  # SDXL: no attention at the top level, 2 transformers deep below, text_time additions
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2), cross_attention_dim=128,
                                    attention_head_dim=(1, 2), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=32 + 6 * 8)
    with torch.no_grad():  # diffusers zero-initialises out convs; give them signal so outputs vary
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet.eval()


def _vae(kind: str):
    from diffusers import AutoencoderKL
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         scaling_factor=SCALING[kind]).eval()


def build(kind: str):
    """(diffusers parts, the LDM state dict of the same weights)."""
    unet, vae = _unet(kind), _vae(kind)
    sd = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if kind == "sd1":
        tes = [_text_encoder("clip", 3)]
        sd.update(clip_to_ldm(tes[0], "cond_stage_model.transformer."))
        # old files hold position_ids (some corrupted, as floats): the loader must rebuild them
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3
    elif kind == "sd2v":
        tes = [_text_encoder("openclip", 3)]
        sd.update(open_clip_to_ldm(tes[0], "cond_stage_model.model.", unused_last_block=True))
        sd["v_pred"] = torch.tensor([])  # how ComfyUI marks a v-prediction checkpoint
    else:
        tes = [_text_encoder("clip", 3), _text_encoder("openclip", 4, projection=32)]
        sd.update(clip_to_ldm(tes[0], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(tes[1], "conditioner.embedders.1.model."))
    return (unet, vae, tes), sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("single")
    out = {}
    for kind in ("sd1", "sd2v", "sdxl"):
        parts, sd = build(kind)
        save_checkpoint(base / f"{kind}.safetensors", sd)
        out[kind] = (base / f"{kind}.safetensors", parts, sd)
    return out


def _reference_backend(kind, parts):
    unet, vae, tes = parts
    pads = {"sd1": ["<|endoftext|>"], "sd2v": ["!"], "sdxl": ["<|endoftext|>", "!"]}[kind]
    sched = single_file.scheduler_config("v_prediction" if kind == "sd2v" else "epsilon")
    return DiffusersBackend(unet, vae, tes, [clip_tokenizer(p) for p in pads], sched, device="cpu")


def test_the_shipped_clip_tokenizer():
    sd1, openclip = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    ids = sd1("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
    assert set(ids[7:]) == {49407}  # SD 1.x pads with <|endoftext|>
    ids2 = openclip("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids2[:7] == ids[:7] and set(ids2[7:]) == {0}  # SD 2.x / SDXL's OpenCLIP: "!" (id 0)
    assert len(sd1) == 49408 and sd1.model_max_length == 77


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_single_file_matches_the_diffusers_models(kind, files):
    path, parts, _ = files[kind]
    ref, b = _reference_backend(kind, parts), DiffusersBackend.load(path, device="cpu")
    assert b.schedule.prediction_type == ("v_prediction" if kind == "sd2v" else "epsilon")
    assert b.is_sdxl == (kind == "sdxl") and b.vae.config.scaling_factor == SCALING[kind]
    same = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                "down_block_types", "up_block_types", "addition_time_embed_dim", "attention_head_dim",
                "transformer_layers_per_block", "projection_class_embeddings_input_dim"):
        assert same(b.unet.config[key]) == same(ref.unet.config[key]), key
    prompts = ["a photo of a cat", ""]
    with torch.no_grad():
        c_ref, c = ref.encode_text(prompts), b.encode_text(prompts)
        for k in ("context", "pooled"):
            if k in c_ref:
                torch.testing.assert_close(c[k], c_ref[k], atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
        torch.testing.assert_close(b.denoise(x, t, c_ref), ref.denoise(x, t, c_ref), atol=1e-5, rtol=1e-5)
        px = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        torch.testing.assert_close(b.encode_images(px), ref.encode_images(px), atol=1e-5, rtol=1e-5)
        lat = torch.randn(1, 4, 8, 8, generator=g)
        torch.testing.assert_close(b.decode_latents(lat), ref.decode_latents(lat), atol=1e-5, rtol=1e-5)
    assert b.resolution == (1024 if kind == "sdxl" else 768 if kind == "sd2v" else 512)  # the family's native size
    assert all(p.device.type == "cpu" and not p.is_meta for p in b.parameters())


def test_prediction_type_sources(files, tmp_path, monkeypatch):
    _, _, sd1 = files["sd1"]
    spec = tmp_path / "spec.safetensors"
    save_checkpoint(spec, sd1, metadata={"modelspec.prediction_type": "v"})  # kohya's ModelSpec field
    assert DiffusersBackend.load(spec, device="cpu").schedule.prediction_type == "v_prediction"
    path, _, sd2 = files["sd2v"]
    assert DiffusersBackend.load(path, device="cpu", prediction_type="epsilon").schedule.prediction_type == "epsilon"
    bare = tmp_path / "sd2.safetensors"  # no v_pred key, no metadata: the WebUI's SD 2.x test decides
    save_checkpoint(bare, {k: v for k, v in sd2.items() if k != "v_pred"})
    calls = []
    monkeypatch.setattr(single_file, "looks_v_prediction", lambda unet: calls.append(unet) or True)
    b = DiffusersBackend.load(bare, device="cpu")
    assert calls and b.schedule.prediction_type == "v_prediction" and b.resolution == 768
    monkeypatch.setattr(single_file, "looks_v_prediction", lambda unet: False)
    assert DiffusersBackend.load(bare, device="cpu").resolution == 512  # SD 2.x-base


def test_sd2_text_tower_loses_only_an_unused_last_block(files):
    _, _, sd = files["sd2v"]
    p = "cond_stage_model.model."
    released = {k: v for k, v in sd.items() if k.startswith(p)}  # 3 blocks and a projection, as SD 2.x ships
    used = single_file._penultimate(released, p)
    assert single_file._count(used, p + "transformer.resblocks.") == 2 and p + "text_projection" not in used
    assert single_file._penultimate(used, p) == used  # as diffusers' converter writes it: already penultimate


def test_v_prediction_test_on_stand_in_unets():
    class Stand(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.w, self.f = torch.nn.Parameter(torch.zeros(1)), f
            self.config = type("C", (), {"in_channels": 4, "cross_attention_dim": 8})

        def forward(self, x, t, encoder_hidden_states, return_dict):
            assert t.tolist() == [999] and encoder_hidden_states.shape == (1, 2, 8)
            return (self.f(x),)
    assert not looks_v_prediction(Stand(lambda x: x * 0.99))  # ε ≈ x_t at t=999
    assert looks_v_prediction(Stand(lambda x: -3 * x - 1))  # v ≈ -x0: far below the input


def _edit(sd, drop=(), **put):
    out = {k: v for k, v in sd.items() if not any(k.startswith(d) for d in drop)}
    out.update({k.replace("__", "."): v for k, v in put.items()})
    return out


@pytest.mark.parametrize("case,needle", [
    ("lora", "is a LoRA"), ("inpaint", "inpainting"), ("sd3", "Stable Diffusion 3"), ("flux", "Flux"),
    ("vae_only", "only a VAE"), ("unet_only", "without its VAE and text encoder"), ("junk", "could not be read"),
    ("missing", "missing"), ("ckpt", "--trust-pickle"), ("refiner", "SDXL refiner"),
])
def test_wrong_files_give_one_line_errors(case, needle, files, tmp_path):
    _, _, sd = files["sd1"]
    path = tmp_path / "model.safetensors"
    w = torch.zeros(4, 4)
    if case == "lora":
        save_checkpoint(path, {"lora_unet_down_blocks_0_attn.lora_up.weight": w, "lora_unet_x.alpha": torch.ones(())})
    elif case == "inpaint":
        conv = sd["model.diffusion_model.input_blocks.0.0.weight"]
        save_checkpoint(path, {**sd, "model.diffusion_model.input_blocks.0.0.weight": conv.new_zeros(32, 9, 3, 3)})
    elif case == "sd3":
        save_checkpoint(path, {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": w})
    elif case == "flux":
        save_checkpoint(path, {"double_blocks.0.img_attn.norm.key_norm.scale": w})
    elif case == "vae_only":
        save_checkpoint(path, {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage")})
    elif case == "unet_only":
        save_checkpoint(path, _edit(sd, drop=("first_stage_model.", "cond_stage_model.")))
    elif case == "junk":
        path.write_bytes(b"not a checkpoint at all")
    elif case == "missing":
        save_checkpoint(path, _edit(sd, drop=("model.diffusion_model.middle_block.1.proj_out.",)))
    elif case == "ckpt":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": sd}, path)
    elif case == "refiner":
        save_checkpoint(path, _edit(sd, drop=("cond_stage_model.",),
                                    conditioner__embedders__0__model__token_embedding__weight=w))
    with pytest.raises(VDUError) as e:
        DiffusersBackend.load(path, device="cpu")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and len(msg) < 300, msg


def test_trusted_ckpt_loads(files, tmp_path):
    path, parts, sd = files["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 5}, ckpt)
    b = DiffusersBackend.load(ckpt, device="cpu", trust_pickle=True)
    torch.testing.assert_close(b.unet.conv_in.weight, parts[0].conv_in.weight)


def test_stored_dtype_is_kept_or_overridden(files, tmp_path):
    _, _, sd = files["sd1"]
    half = tmp_path / "half.safetensors"
    save_checkpoint(half, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    b = DiffusersBackend.load(half, device="cpu")
    assert b.unet.dtype == b.vae.dtype == b.text_encoders[0].dtype == torch.float16
    assert DiffusersBackend.load(half, device="cpu", dtype=torch.float32).unet.dtype == torch.float32


def test_config_dir_still_works(files, tmp_path):
    from diffusers import StableDiffusionPipeline
    path, parts, _ = files["sd1"]
    unet, vae, tes = parts
    folder = tmp_path / "configs"
    StableDiffusionPipeline(vae=vae, text_encoder=tes[0], tokenizer=clip_tokenizer("<|endoftext|>"), unet=unet,
                            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    b = DiffusersBackend.load(path, config_dir=str(folder), device="cpu", prediction_type="v_prediction")
    assert b.schedule.prediction_type == "v_prediction"
    torch.testing.assert_close(b.unet.conv_in.weight, unet.conv_in.weight)


def _scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(single_file.scheduler_config("epsilon"))


def test_cli_unlearns_from_a_single_file(files, tmp_path, red_images):
    from safetensors.torch import load_file
    from vdu_engine.cli import main
    path, _, _ = files["sd1"]
    out = tmp_path / "forget.safetensors"
    small = ["--steps", "1", "--resolution", "16", "--prior", "isotropic", "--num-images", "2", "--batch-size", "2",
             "--sample-steps", "2", "--fisher-samples", "2", "--neighbours", "0",
             "--cache-dir", str(tmp_path / "cache")]
    assert main(["unlearn", str(path), "--images", str(red_images), "--concept", "a red circle", "--out", str(out),
                 "--device", "cpu", "--prediction-type", "epsilon", *small]) == 0
    assert any(k.startswith("lora_unet_") for k in load_file(str(out)))


# diffusers' published configs of the real models (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0): what the weights' shapes and each family's conventions must give.
CROSS3 = ["CrossAttnDownBlock2D"] * 3
REAL = {
    "sd1": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                          attention_head_dim=8, use_linear_projection=False, sample_size=64,
                          down_block_types=CROSS3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           hidden_act="quick_gelu")], px=512),
    "sd2": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                          sample_size=96, down_block_types=CROSS3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                text=[dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           hidden_act="gelu")], px=768),
    "sdxl": dict(unet=dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                           attention_head_dim=[5, 10, 20], use_linear_projection=True, sample_size=128,
                           transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                           down_block_types=["DownBlock2D"] + CROSS3[:2],
                           up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]),
                 text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu"),
                       dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280)], px=1024),
}


def _real_size_ldm(family):
    """The LDM state dict of a full-size model, as meta tensors (shapes without memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    spec = REAL[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        tes = [(CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **t)) for t in spec["text"]]
    sd = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if family == "sd1":
        sd.update(clip_to_ldm(tes[0], "cond_stage_model.transformer."))
    elif family == "sd2":  # as released: all 24 blocks and the projection
        sd.update({k: v.to("meta") for k, v in open_clip_to_ldm(tes[0], "cond_stage_model.model.", True).items()})
    else:
        sd.update(clip_to_ldm(tes[0], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(tes[1], "conditioner.embedders.1.model."))
    return sd


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_sizes_give_the_published_configs(family):
    sd = _real_size_ldm(family)
    single_file.refuse_non_models(sd, "x.safetensors")
    assert single_file.family_of(sd, "x.safetensors") == family
    pred = "v_prediction" if family == "sd2" else "epsilon"
    m = single_file._assemble(sd, {}, family, pred, None, "x.safetensors")
    spec, same = REAL[family], lambda v: list(v) if isinstance(v, (list, tuple)) else v
    for k, v in spec["unet"].items():
        assert same(m.unet.config[k]) == v, (k, m.unet.config[k])
    assert list(m.vae.config.block_out_channels) == [128, 256, 512, 512] and m.vae.config.sample_size == spec["px"]
    for te, want in zip(m.text_encoders, spec["text"]):
        assert {k: getattr(te.config, k) for k in want} == want
    assert len(m.tokenizers) == len(spec["text"]) and m.scheduler_config["prediction_type"] == pred
