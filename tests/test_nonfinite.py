"""nan/inf where a part of the model makes it: a one-line error naming that part and its fix, before
training and before anything is written; the nan-loss error only for a loss that diverges itself."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vdu_engine import Backend, DiffusersBackend, ForgetSet, VDUError, unlearn
from vdu_engine import train
from vdu_engine.cli import main
from vdu_engine.sampling import ddim_sample

NAN = float("nan")


@pytest.fixture
def backend(tiny_sd1):
    return DiffusersBackend.load(tiny_sd1, device="cpu")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the training loop starts: every check comes before it."""
    def refuse(*a, **kw):
        raise AssertionError("training started")
    monkeypatch.setattr(train, "_optimise", refuse)


def stops(backend, cfg, forget=None) -> str:
    """The run's error message, checked to be one line."""
    with pytest.raises(VDUError) as e:
        unlearn(backend, cfg, forget)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_vae_nan_names_the_vae_and_writes_nothing(monkeypatch, no_training, tiny_sd1, red_images, tmp_path, capsys):
    real = DiffusersBackend.encode_images

    def overflowing(self, pixels):
        lat = real(self, pixels)
        lat[0] = NAN  # one image of four, as an fp16 SDXL VAE does on bright ones
        return lat
    monkeypatch.setattr(DiffusersBackend, "encode_images", overflowing)
    out = tmp_path / "forget.safetensors"
    rc = main(["unlearn", str(tiny_sd1), "--images", str(red_images), "--concept", "a red circle", "--out", str(out),
               "--steps", "1", "--resolution", "16", "--prior", "isotropic", "--neighbours", "0", "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1
    assert "the VAE returned non-finite latents (nan/inf) for 1 of 4 images" in errors[0]
    assert "--dtype float32" in errors[0] and "sdxl-vae-fp16-fix" in errors[0]
    assert not list(tmp_path.glob("*.safetensors*"))


@pytest.mark.parametrize("images", [True, False], ids=["forget-images", "prompt-only"])
def test_text_encoder_nan_names_the_text_encoder(images, backend, no_training, fast_config, red_images):
    real = backend.encode_text
    backend.encode_text = lambda prompts: {k: v * NAN for k, v in real(prompts).items()}
    forget = ForgetSet.from_folder(red_images) if images else None
    message = stops(backend, fast_config(prior="isotropic", neighbours=0), forget)
    assert message.startswith("the text encoder returned non-finite embeddings (nan/inf)")
    assert "--dtype float32" in message


SAMPLES = "the UNet's samples (the images the model generates itself)"


@pytest.mark.parametrize("objective,images,own,part", [
    ("vdu", True, False, "the frozen UNet's predictions (made before training)"),  # the forget rows' bound
    ("esd", True, False, "the frozen UNet's predictions (made before training)"),  # the pool's targets
    ("vdu", True, True, SAMPLES),  # the model's own images of the forget captions
    ("vdu", False, False, SAMPLES),  # prompt-only forget images
])
def test_unet_inf_names_the_unet_and_its_precision(objective, images, own, part, backend, no_training, fast_config,
                                                    red_images):
    real = backend.denoise
    backend.denoise = lambda x, t, c: real(x, t, c) * float("inf")
    forget = ForgetSet.from_folder(red_images) if images else None
    # destination 0: the destination's pool would be made (and checked) before the forget rows' bound
    cfg = fast_config(objective=objective, prior="isotropic", neighbours=0, destination=0.0, own_forget_images=own)
    message = stops(backend, cfg, forget)
    assert message.startswith(part) and "--dtype float32 --precision fp32" in message


def test_fisher_nan_names_the_prior_and_is_not_cached(monkeypatch, backend, no_training, fast_config, tmp_path):
    def overflowed(backend, targets, *a, **kw):
        return {t.key: torch.full_like(t.module.weight, NAN, dtype=torch.float32) for t in targets}
    monkeypatch.setattr(train, "diagonal_fisher", overflowed)
    cfg = fast_config(prior="fisher", neighbours=0, cache_dir=str(tmp_path / "cache"))
    message = stops(backend, cfg)
    assert message.startswith("the Fisher prior's estimate is non-finite (nan/inf)") and "--prior isotropic" in message
    assert not list((tmp_path / "cache").glob("fisher-*"))  # a bad estimate must not poison later runs


def test_a_cached_nan_fisher_is_named_with_its_file(monkeypatch, backend, no_training, fast_config):
    monkeypatch.setattr(train, "cached_fisher", lambda path, compute: {"layer": torch.full((2, 2), NAN)})
    message = stops(backend, fast_config(prior="fisher", neighbours=0))
    assert "Fisher" in message and "delete " in message and "fisher-" in message


def test_decoded_nan_names_the_vae(backend):
    backend.decode_latents = lambda lat: torch.full((len(lat), 3, 16, 16), NAN)
    with pytest.raises(VDUError, match="the VAE decoded finite latents into non-finite images"):
        ddim_sample(backend, ["a red circle"], seed=0, steps=1, resolution=16)


def test_nan_forget_images_are_named_as_such():
    images = torch.rand(3, 8, 8, 3)
    images[1, 0, 0, 0] = NAN  # e.g. an upstream VAE Decode that overflowed
    with pytest.raises(VDUError, match="the forget images hold non-finite pixels .* in 1 of 3"):
        ForgetSet.from_tensor(images)


def test_the_fix_is_in_the_backends_words(backend, no_training, fast_config, red_images):
    """A front end words its own fixes (ComfyUI: its launch flags); the engine's checks use them."""
    real = backend.encode_images
    backend.encode_images = lambda pixels: real(pixels) * NAN
    backend.fixes = {**Backend.fixes, "vae": "launch ComfyUI with --fp32-vae"}
    message = stops(backend, fast_config(prior="isotropic", neighbours=0), ForgetSet.from_folder(red_images))
    assert message.endswith("for 4 of 4 images; launch ComfyUI with --fp32-vae")


def test_comfyui_fixes_name_comfyuis_launch_flags():
    root = Path(__file__).resolve().parents[1]
    # The pack imports itself relatively (as ComfyUI loads it); comfy itself is imported only in __init__.
    spec = importlib.util.spec_from_file_location("vdu_pack_under_test", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    try:
        spec.loader.exec_module(pack)
        fixes = importlib.import_module(f"{spec.name}.nodes.comfy_backend").ComfyBackend.fixes
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name)]:
            del sys.modules[name]
    assert set(fixes) == set(Backend.fixes)
    assert "--fp32-vae" in fixes["vae"] and "--fp32-text-enc" in fixes["text_encoder"]
    assert "--fp32-unet" in fixes["unet"] and "learning_rate" in fixes["lr"]
