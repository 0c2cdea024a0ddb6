"""The extension inside Forge's own code, in-process, on the CPU.

Forge starts as its webui.py would start it without serving pages: initialize.imports() and
initialize.initialize() (its real paths, options store in a temporary --data-dir, extension
list, script loader, sd_forge_lora) with `--always-cpu --all-in-fp32`, and loads a checkpoint
through its own loader (forge_loader, huggingface_guess detects SD 1.5; sd15_shaped.py: SD 1.5's
widths on two levels). Replaced, in every test: the gradio launch (tabs are built by calling
Forge's ui_tabs_callback, handlers called as gradio would call them; main_entry's
refresh_model_loading_parameters, which the UI's checkpoint menu calls, is called directly) and
device selection (the flags above). Run with .venv-forge/bin/python and FORGE_PATH (`make test`).
"""

import importlib.metadata
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_keys import ARCHS, committed_keys, kohya_lora, ldm_unet_state_dict, unet_keys
from webui_harness import (BAD_INPUTS, check_bad_input_refused, check_interrupt_writes_nothing,
                           check_text_lora_merges, forget_folder, install_extension, pack_module, registered, require,
                           run_red_to_orange, tab_args)

FORGE = require("FORGE_PATH", "gradio")
ARGS = ["--always-cpu", "--all-in-fp32", "--skip-torch-cuda-test", "--skip-version-check",
        "--no-download-sd-model", "--skip-load-model-at-start"]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    work = tmp_path_factory.mktemp("forge")
    os.environ.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      GRADIO_ANALYTICS_ENABLED="False")
    data, lora = work / "data", work / "data" / "models" / "Lora"
    ext = install_extension(data / "extensions")
    ckpt = data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors"
    ckpt.parent.mkdir(parents=True)
    sys.argv = ["webui.py", *ARGS, "--data-dir", str(data), "--ckpt", str(ckpt), "--lora-dir", str(lora)]
    os.chdir(FORGE)
    sys.path.insert(0, str(FORGE))
    from modules import paths  # noqa: F401  (puts huggingface_guess on sys.path)
    from sd15_shaped import with_diffusers
    with_diffusers(ckpt)
    from modules import initialize
    initialize.imports()
    initialize.initialize()
    from modules import script_callbacks
    script_callbacks.before_ui_callback()  # as webui.py does next: the Lora extension registers <lora:…>
    from modules import sd_models, shared
    from modules_forge import main_entry
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()
    assert shared.sd_model.is_sd1
    return SimpleNamespace(shared=shared, lora=lora, ext=ext, work=work)


@pytest.fixture(scope="module")
def tab(webui):
    from modules import script_callbacks
    tabs = {elem_id: (blocks, title) for blocks, title, elem_id in script_callbacks.ui_tabs_callback()}
    assert "vdu_unlearn" in tabs, f"no Unlearn tab among {sorted(tabs)}"
    return SimpleNamespace(blocks=tabs["vdu_unlearn"][0], title=tabs["vdu_unlearn"][1],
                           module=sys.modules["vdu_unlearn.vdu_webui.tab"])


def unet_weights(shared) -> dict:
    return shared.sd_model.forge_objects_original.unet.model.diffusion_model.state_dict()


def txt2img(shared, prompt: str, seed: int = 7) -> np.ndarray:
    """One image through Forge's own pipeline (processing, its sampler, sd_forge_lora)."""
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt="", seed=seed, steps=2, width=64, height=64,
        sampler_name="Euler", scheduler="Automatic", cfg_scale=5.0, do_not_save_samples=True, do_not_save_grid=True)
    return np.asarray(processing.process_images(p).images[0])


def test_the_script_loads_and_registers_the_unlearn_tab(webui, tab):
    from modules import scripts
    assert any(s.path.endswith("vdu_unlearn_tab.py") for s in scripts.list_scripts("scripts", ".py"))
    assert tab.title == "Unlearn"
    assert registered(tab.blocks, "train") and registered(tab.blocks, "interrupt")


def test_a_one_word_concept_trains_forges_text_encoder_and_its_lora_loader_applies_it(webui, tab, tmp_path, capfd):
    """A one-word concept with a one-word anchor (the tab's fields): VDU trains deltas on Forge's own CLIP-L
    (text_remap.py) through Forge's text-processing engine and leaves its weights as they were; sd_forge_lora
    matches every key of the file, and `<lora:…:1>` applies it (webui_harness.check_text_lora_merges). It is the
    first run of the module, before Forge has encoded any prompt: the run then meets CLIP's embeddings as Forge
    loaded them (fp16 inference tensors, cast on Forge's first encode), as a user does who opens the tab first."""
    engine = webui.shared.sd_model
    clip = engine.forge_objects_original.clip.cond_stage_model.clip_l.transformer
    sd = run_red_to_orange(tab, tmp_path, webui.lora, clip)
    networks = sys.modules["networks"]
    capfd.readouterr()
    networks.load_lora_for_models(engine.forge_objects_original.unet, engine.forge_objects_original.clip, sd,
                                  1.0, 1.0, filename="red-to-orange")
    printed = capfd.readouterr().out
    assert f"with {len(sd) // 3} keys" in printed and "(skipped 0 keys)" in printed, printed
    assert "unmatched" not in printed, printed
    networks.list_available_networks()
    check_text_lora_merges(sd, clip, lambda prompt: txt2img(webui.shared, prompt),
                           lambda prompt: engine.get_learned_conditioning([prompt]).float().clone())


def test_a_run_from_the_tab_writes_the_lora_and_leaves_the_model_as_it_was(webui, tab, tmp_path):
    """UNet weights and a txt2img image (same seed, prompt) bit-identical after the run."""
    from safetensors import safe_open
    before = {k: v.clone() for k, v in unet_weights(webui.shared).items()}
    image = txt2img(webui.shared, "a red circle")
    t0 = time.perf_counter()
    args = tab_args(tab.module, folder=str(forget_folder(tmp_path)))
    gallery, curve, message = registered(tab.blocks, "train")(*args)
    print(f"tab run: {time.perf_counter() - t0:.1f} s")
    assert "saved" in message and "forget-red.safetensors" in message, message
    assert len(gallery) == 4 and curve is not None
    with safe_open(str(webui.lora / "forget-red.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and meta["ss_base_model_version"] == "sd_v1"
    after = unet_weights(webui.shared)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(image, txt2img(webui.shared, "a red circle"))


def test_forges_lora_loader_matches_every_key_and_applies_it(webui, tab, capfd):
    """sd_forge_lora's load_lora_for_models (backend/patcher/lora.py's key maps): no unmatched key,
    none skipped. `<lora:forget-red:1>` patches exactly up @ down · alpha/rank into that layer for
    the generation (a 3-step LoRA on a random model moves a 64-px image by less than 8-bit
    rounding, so weights are compared, not images); a generation without it restores them."""
    from backend.utils import get_attr, load_torch_file
    networks = sys.modules["networks"]
    engine = webui.shared.sd_model
    sd = load_torch_file(str(webui.lora / "forget-red.safetensors"), safe_load=True)
    networks.load_lora_for_models(engine.forge_objects_original.unet, engine.forge_objects_original.clip, sd,
                                  1.0, 1.0, filename="forget-red")
    printed = capfd.readouterr().out
    assert f"with {len(sd) // 3} keys" in printed and "(skipped 0 keys)" in printed, printed
    assert "unmatched" not in printed and "mismatch" not in printed.lower(), printed
    unet = engine.forge_objects_original.unet.model.diffusion_model
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down, alpha = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"], float(sd[f"{key}.alpha"])
    w0 = get_attr(unet, name).detach().clone()
    networks.list_available_networks()  # the Lora tab's refresh
    plain = txt2img(webui.shared, "a red circle")
    txt2img(webui.shared, "a red circle <lora:forget-red:1>")
    torch.testing.assert_close(get_attr(unet, name).detach() - w0, up @ down * alpha / up.shape[1],
                               rtol=1e-3, atol=1e-6)
    assert np.array_equal(plain, txt2img(webui.shared, "a red circle"))
    assert torch.equal(get_attr(unet, name).detach(), w0)


def test_interrupt_mid_run_writes_nothing(webui, tab, tmp_path):
    check_interrupt_writes_nothing(webui, tab, tmp_path)


@pytest.mark.parametrize("values, words", BAD_INPUTS)
def test_bad_input_gives_a_message_and_no_file(webui, tab, tmp_path, values, words):
    check_bad_input_refused(webui, tab, tmp_path, values, words)


def test_install_py_run_by_forges_installer_keeps_torch(webui, capfd):
    from modules import launch_utils
    torch_before = importlib.metadata.version("torch")
    launch_utils.run_extension_installer(str(webui.ext))
    assert "[vdu-unlearn] all requirements present" in capfd.readouterr().out
    assert importlib.metadata.version("torch") == torch_before


def _forge_backend_package():
    """Forge's `backend` package without starting the WebUI: on sys.path as modules/paths.py puts it (with
    huggingface_guess and packages_3rdparty), and this suite's flags (--always-cpu --all-in-fp32) in its args
    before memory_management reads them at import."""
    for path in (FORGE, FORGE / "repositories" / "huggingface_guess", FORGE / "packages_3rdparty"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import backend.args
    if "backend.memory_management" not in sys.modules:
        vars(backend.args.args).update(vars(backend.args.parser.parse_known_args(ARGS)[0]))


def _full_size_unet_patcher(arch: str, capfd):
    """A full-size checkpoint's UNet as Forge's loader builds it (backend/loader.py), on the meta device:
    huggingface_guess reads the architecture from the checkpoint's shapes, Forge's UNet class is built with
    Forge's operations and loads the checkpoint's (meta) tensors, and UnetPatcher wraps it with the
    predictor of the repo's scheduler config, as Forge's SD 1.5 / SDXL engines do."""
    _forge_backend_package()
    import diffusers
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher
    from backend.state_dict import load_state_dict, try_filter_state_dict
    sd = ldm_unet_state_dict(arch)
    guess = huggingface_guess.guess(sd)
    assert type(guess).__name__ == {"sd15": "SD15", "sdxl": "SDXL"}[arch]
    meta = torch.device("meta")
    with using_forge_operations(device=meta, dtype=torch.float32, manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(guess.unet_config).to(device=meta, dtype=torch.float32)
    capfd.readouterr()
    load_state_dict(unet, try_filter_state_dict(sd, guess.unet_key_prefix))
    printed = capfd.readouterr().out
    assert "Missing" not in printed and "Unexpected" not in printed, printed  # the checkpoint fits Forge's UNet
    unet._internal_dict = guess.unet_config
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = meta
    folder = FORGE / "backend" / "huggingface" / guess.huggingface_repo / "scheduler"
    scheduler_cls = getattr(diffusers, json.loads((folder / "scheduler_config.json").read_text())["_class_name"])
    return UnetPatcher.from_model(model=unet, diffusers_scheduler=scheduler_cls.from_pretrained(str(folder)),
                                  config=guess)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_forge_backend_gives_the_committed_keys_and_forges_lora_loader_takes_them(arch, capfd,
                                                                                            monkeypatch):
    """Cross-host LoRAs, Forge's half (the list: tests/lora_keys.py). On a full-size SD 1.5 / SDXL UNet built
    as Forge builds it (on meta): ForgeBackend(engine) — its own __init__, with load_model_gpu, which only moves
    weights, made a no-op — offers exactly the committed keys and shapes, so a LoRA made in Forge has the keys
    of one made in ComfyUI, A1111 or diffusers. Forge's own loader steps for a UNet LoRA (load_lora_for_models:
    backend/patcher/lora.py's model_lora_keys_unet and load_lora, then the patcher's add_patches) take the
    engine's LoRA of every committed key: none unmatched, none skipped, each onto the layer the backend trains."""
    patcher = _full_size_unet_patcher(arch, capfd)
    import backend.memory_management
    from backend.patcher.lora import load_lora, model_lora_keys_unet
    monkeypatch.setattr(backend.memory_management, "load_model_gpu", lambda *a, **k: None)
    engine = SimpleNamespace(is_sd1=arch == "sd15", is_sd2=False, is_sdxl=arch == "sdxl", is_inpaint=False,
                             forge_objects_original=SimpleNamespace(unet=patcher), get_learned_conditioning=None)
    b = pack_module("vdu_webui.forge_backend").ForgeBackend(engine)
    targets = b.targets()
    committed = committed_keys(arch)
    assert unet_keys(targets) == committed
    lora = kohya_lora(targets)

    key_map = model_lora_keys_unet(patcher.model)
    patches, unmatched = load_lora(dict(lora), key_map)
    assert unmatched == {}
    names = {id(m): n for n, m in b.unet.named_modules()}  # the backend's private copy: same paths
    assert {t.key: key_map.get(t.key) for t in targets} == {
        t.key: f"diffusion_model.{names[id(t.module)]}.weight" for t in targets}
    loaded = patcher.clone().add_patches(filename="all-layers", patches=patches, strength_patch=1.0)
    assert len(patches) == len(committed) and set(loaded) == set(patches)
