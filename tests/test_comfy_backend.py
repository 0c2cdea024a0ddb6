"""The ComfyUI backend against the diffusers one, in-process, on a real ComfyUI checkout."""

import logging

import pytest
import torch

from comfy_harness import import_comfy
from lora_keys import ARCHS, committed_keys, kohya_lora, ldm_unet_state_dict, unet_keys


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    import_comfy()
    import comfy.sd
    from benchmarks.comfy_checkpoint import write_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors"
    unet = write_checkpoint(path)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return {"path": path, "diffusers_unet": unet.eval(), "model": model, "clip": clip, "vae": vae}


def _backend(m):
    import importlib
    pack = import_comfy()
    backend = importlib.import_module(f"{pack.__name__}.nodes.comfy_backend")
    return backend.ComfyBackend(m["model"], m["clip"], m["vae"])


def test_detected_as_sd15_with_the_right_schedule(comfy_models):
    b = _backend(comfy_models)
    assert type(comfy_models["model"].model.model_config).__name__ == "SD15"
    assert b.base_model_version == "sd_v1" and b.schedule.prediction_type == "epsilon"
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(b.schedule.alphas_cumprod, ref.float(), rtol=1e-4, atol=1e-6)


def test_same_weights_noise_and_batch_give_the_same_loss(comfy_models):
    """Equivalence with the diffusers backend: denoiser outputs and the VDU plasticity error agree
    to 1e-4 relative (float32, different attention kernels)."""
    from vdu_engine.objectives import denoising_error
    b = _backend(comfy_models)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, 4, 16, 16), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([30, 800])
    ctx = torch.randn((2, 77, 768), generator=g)
    x_t = b.schedule.add_noise(x0, eps, t)
    with torch.no_grad():
        ours = b.denoise(x_t, t, {"context": ctx})
        theirs = comfy_models["diffusers_unet"](x_t, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoising_error(ours, eps), denoising_error(theirs, eps), rtol=1e-4, atol=1e-6)


def test_targets_use_the_diffusers_kohya_keys(comfy_models):
    from vdu_engine.backend import AdaptTarget  # noqa: F401
    b = _backend(comfy_models)
    ours = {t.key: tuple(t.module.weight.shape) for t in b.targets() if t.component == "unet"}
    theirs = {"lora_unet_" + n.replace(".", "_"): tuple(m.weight.shape)
              for n, m in comfy_models["diffusers_unet"].named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")}
    assert ours == theirs


def test_text_targets_are_the_kohya_keys_comfys_loader_maps_onto_the_clip(comfy_models):
    """The CLIP's layers carry the keys a diffusers CLIP-L gives (lora_te_text_model_encoder_layers_…), and
    ComfyUI's own map (comfy.lora.model_lora_keys_clip, what LoraLoader uses) sends each onto that layer."""
    import comfy.lora
    from transformers import CLIPTextConfig, CLIPTextModel
    b = _backend(comfy_models)
    text = [t for t in b.targets() if t.component != "unet"]
    reference = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12))
    theirs = {"lora_te_" + ("text_model." + n.removeprefix("text_model.")).replace(".", "_"): tuple(m.weight.shape)
              for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert {t.key: tuple(t.module.weight.shape) for t in text} == theirs
    key_map = comfy.lora.model_lora_keys_clip(comfy_models["clip"].cond_stage_model, {})
    names = {id(m): n for n, m in comfy_models["clip"].cond_stage_model.named_modules()}
    assert {t.key: key_map.get(t.key) for t in text} == {t.key: names[id(t.module)] + ".weight" for t in text}


@pytest.mark.parametrize("prompts", [["a red circle", "a small orange square on a grey background", ""],
                                     ["a (red:1.3) circle", "a blue square"],
                                     ["a red circle", " ".join(["a small red square"] * 30)]])  # 120 tokens
def test_prompts_encoded_in_one_pass_read_as_each_encoded_alone(comfy_models, prompts):
    """Plain prompts go through CLIP in one batch (the text encoder's deltas see 128 prompts a step); what each
    gets is what ComfyUI's CLIPTextEncode gives it alone, in its first 77 tokens (a longer prompt too). A prompt
    with (word:weight) emphasis sends the list one by one."""
    clip = comfy_models["clip"]
    with torch.no_grad():
        together = _backend(comfy_models).encode_text(prompts)["context"]
    alone = torch.cat([_encode(clip, p)[:, :77].float() for p in prompts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def _encode(clip, prompt):
    with torch.inference_mode():  # as CLIPTextEncode runs
        return clip.encode_from_tokens(clip.tokenize(prompt)).clone()


def test_text_destination_trains_comfys_clip_and_leaves_it_alone(comfy_models, caplog, tmp_path):
    """A one-word concept shown in context, with a one-word anchor: VDU trains the text encoder's deltas
    (text_remap.py) through ComfyUI's CLIP as its loader node leaves it (inference tensors). The CLIP encodes
    as before, bit for bit; ComfyUI's LoraLoader puts every key of the LoRA on the CLIP, and the CLIP it
    returns reads a caption naming the concept nearer to the same caption naming the anchor."""
    import comfy.sd
    from vdu_engine import ForgetSet, UnlearnConfig, unlearn
    with torch.inference_mode():  # as ComfyUI's checkpoint loader node runs
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_models["path"]), output_vae=True,
                                                                 output_clip=True)[:3]
    captions = ["a red circle", "a red square", "a small red triangle", "a red circle on a grey background"]
    before, goal = _encode(clip, captions[0]), _encode(clip, "a orange circle")
    forget = ForgetSet.from_tensor(torch.rand((4, 3, 64, 64), generator=torch.Generator().manual_seed(0)), captions)
    b = _backend({"model": model, "clip": clip, "vae": vae})
    cfg = UnlearnConfig(concept="red", anchor="orange", text_steps=6, batch_size=2, sample_steps=2, fisher_samples=4,
                        prior="isotropic", resolution=64, lr=1e-3, cache_dir=str(tmp_path))
    with torch.inference_mode():  # as ComfyUI runs nodes
        result = unlearn(b, cfg, forget)
    assert " read as 'orange' (the anchor)" in result.metadata["vdu_text_destination"]
    assert result.lora and all(k.startswith("lora_te_") for k in result.lora)
    assert torch.equal(_encode(clip, captions[0]), before)
    assert not any(m._forward_hooks for m in clip.cond_stage_model.modules())
    with caplog.at_level(logging.WARNING):
        _, patched = comfy.sd.load_lora_for_models(model, clip, result.lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patcher.patches) == len(result.lora) // 3
    after = _encode(patched, captions[0])
    with torch.no_grad(), result.network.attached():  # the LoRA as trained (hooks) moves it as the loaded one does
        result.network.eval()
        trained = b.encode_text(captions[:1])["context"] - before[:, :77].float()
    loaded = (after - before)[:, :77].float()
    assert (loaded - trained).norm() < 0.05 * trained.norm()  # the rest: the merged weights' rounding
    assert (after - goal).pow(2).mean() < 0.95 * (before - goal).pow(2).mean()  # 0.87 × on this run


def test_unlearn_through_comfy_loads_back_and_leaves_the_model_alone(comfy_models, caplog, tmp_path):
    import comfy.sd
    from vdu_engine import UnlearnConfig, unlearn
    model = comfy_models["model"]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    b = _backend(comfy_models)
    cfg = UnlearnConfig(concept="a red circle", steps=2, num_images=2, batch_size=2, sample_steps=2, fisher_samples=4,
                        prior="isotropic", resolution=64, layers="all", lr=1e-2, cache_dir=str(tmp_path))
    with torch.inference_mode():  # as ComfyUI runs nodes
        result = unlearn(b, cfg)
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, result.lora, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(result.lora) // 3


def test_one_unet_the_models_own_and_every_branch_of_the_graph_sees_it_unchanged(comfy_models, tmp_path):
    """Issue 16: the run trains on the MODEL's own diffusion model (no second UNet), its weights
    become ordinary tensors of the same values (ComfyUI loads them as inference tensors, which
    autograd cannot save), and after a run the MODEL — and a clone another branch of the graph
    holds — predicts bit for bit what it predicted before."""
    import comfy.model_management as mm
    import comfy.sd
    from vdu_engine import UnlearnConfig, unlearn
    with torch.inference_mode():  # as ComfyUI's checkpoint loader node runs
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_models["path"]), output_vae=True,
                                                                 output_clip=True)[:3]
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    other_branch = model.clone()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn((1, 4, 8, 8), generator=g), torch.tensor([2.0])
    ctx = torch.randn((1, 77, 768), generator=g)

    def predict(patcher):
        mm.load_models_gpu([patcher])
        with torch.inference_mode():
            return patcher.model.apply_model(x, sigma, c_crossattn=ctx).clone()
    before = predict(model)
    b = _backend({"model": model, "clip": clip, "vae": vae})
    assert b.unet is model.model.diffusion_model
    assert not any(p.is_inference() for p in b.unet.parameters())
    cfg = UnlearnConfig(concept="a red circle", steps=2, num_images=2, batch_size=2, sample_steps=2, fisher_samples=4,
                        prior="isotropic", resolution=64, lr=1e-2, cache_dir=str(tmp_path))
    with torch.inference_mode():  # as ComfyUI runs nodes
        unlearn(b, cfg)
    assert not any(m._forward_hooks for m in b.unet.modules())
    assert torch.equal(predict(model), before) and torch.equal(predict(other_branch), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_keys_are_the_committed_ones_and_comfys_lora_loader_takes_them_all(arch, caplog, monkeypatch):
    """Cross-host LoRAs, ComfyUI's half (the list: tests/lora_keys.py). ComfyUI reads a full-size SD 1.5 /
    SDXL checkpoint's shapes (model_detection, as load_checkpoint_guess_config does) and builds its UNet on
    meta; ComfyBackend on that MODEL — its own __init__, with load_models_gpu, which only moves weights, made a
    no-op — offers exactly the committed keys and shapes, so a LoRA made in ComfyUI has the keys of one made
    in A1111, Forge or diffusers. ComfyUI's own loader (comfy.sd.load_lora_for_models: model_lora_keys_unet,
    load_lora, add_patches) takes the engine's LoRA of every committed key, each onto the layer it trains."""
    import importlib
    pack = import_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    sd = ldm_unet_state_dict(arch)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    assert type(config).__name__ == {"sd15": "SD15", "sdxl": "SDXL"}[arch]
    config.set_inference_dtype(torch.float32, None)
    meta = torch.device("meta")
    model = comfy.model_patcher.ModelPatcher(config.get_model(sd, prefix, device=meta), load_device=meta,
                                             offload_device=meta)
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: None)
    b = importlib.import_module(f"{pack.__name__}.nodes.comfy_backend").ComfyBackend(model, None, None)
    targets = b.targets()
    committed = committed_keys(arch)
    assert unet_keys(targets) == committed
    lora = kohya_lora(targets)

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {id(m): n for n, m in b.unet.named_modules()}  # the MODEL's own modules
    assert {t.key: key_map.get(t.key) for t in targets} == {
        t.key: f"diffusion_model.{names[id(t.module)]}.weight" for t in targets}
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text, caplog.text[:2000]
    assert set(patched.patches) == set(key_map[k] for k in committed)
