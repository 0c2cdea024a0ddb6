"""LoRA export: kohya keys only, string metadata, diffusers loading, equal predictions."""

import pytest
import torch
from safetensors import safe_open

from vdu_engine import DiffusersBackend, VDUError, unlearn


def _trained(path, fast_config, **kw):
    b = DiffusersBackend.load(path, device="cpu")
    cfg = fast_config(prior="isotropic", steps=3, lr=5e-2, **kw)
    return b, unlearn(b, cfg)


def _peft_lora_layers(model):
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_kohya_file_loads_in_diffusers_with_equal_predictions(kind, tiny_models, fast_config, tmp_path):
    from diffusers import DiffusionPipeline
    b, result = _trained(tiny_models[kind], fast_config, layers="all")
    out = result.save(tmp_path / "forget.safetensors")

    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
              "vdu_objective", "vdu_concept", "vdu_steps", "vdu_gamma", "vdu_prior", "vdu_seed",
              "vdu_num_forget_images", "vdu_engine_version"):
        assert isinstance(meta[k], str) and meta[k] != "", k
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if kind == "sdxl" else "sd_v1")
    n_layers = len(keys) // 3
    assert any(result.lora[k].abs().sum() > 0 for k in keys if k.endswith("lora_up.weight"))

    pipe = DiffusionPipeline.from_pretrained(tiny_models[kind], local_files_only=True)
    pipe.load_lora_weights(str(out))
    assert _peft_lora_layers(pipe.unet) == n_layers  # every key matched a layer, none left over

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = b.encode_text(["a red circle", "a blue square"])
    with torch.no_grad(), result.network.attached():
        ours = b.denoise(x, t, cond)
    extra = ({"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}
             if kind == "sdxl" else {})
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["context"], **extra).sample
        base = b.denoise(x, t, cond)
    assert (ours - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_text_encoder_layers_export_with_te_keys(tiny_sd1, fast_config, tmp_path):
    b, result = _trained(tiny_sd1, fast_config, train_text_encoder=True)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in result.lora)
    from diffusers import StableDiffusionPipeline
    out = result.save(tmp_path / "te.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True)
    pipe.load_lora_weights(str(out))
    n_te = len({k.split(".")[0] for k in result.lora if k.startswith("lora_te")})
    assert _peft_lora_layers(pipe.text_encoder) == n_te


def test_save_is_atomic_and_never_overwrites(tiny_sd1, fast_config, tmp_path, monkeypatch):
    _, result = _trained(tiny_sd1, fast_config)
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(VDUError, match="already exists"):
        result.save(path)
    assert path.read_bytes() == b"precious"
    result.save(path, overwrite=True)
    assert path.read_bytes() != b"precious"

    import vdu_engine.saving as saving

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(saving, "save_file", crash)
    with pytest.raises(OSError):
        result.save(tmp_path / "y.safetensors")
    assert list(tmp_path.iterdir()) == [path]  # no partial or temporary file left behind
