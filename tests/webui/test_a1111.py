"""The extension inside A1111 v1.10.1's own code, in-process, on the CPU.

The WebUI starts as webui.py would start it without serving pages: initialize.imports() and
initialize.initialize() (its real paths, options store in a temporary --data-dir, extension
list, script loader, Lora extension) with `--use-cpu all --no-half --precision full`, and
loads a checkpoint through its own loader (sd15_shaped.py: SD 1.5's widths on two levels, with
the .yaml beside it that A1111 reads for that layout). Replaced, in every test: the gradio
launch (tabs are built by calling A1111's own ui_tabs_callback, handlers called as gradio would
call them) and device selection (the command-line flags above). The hub is replaced by files:
CLIP-L's config and tokenizer in a local hub cache (HF_HUB_OFFLINE=1; A1111 reads the weights
from the checkpoint). Run with .venv-a1111/bin/python and A1111_PATH (`make test` does).
"""

import importlib.metadata
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_keys import ARCHS, committed_keys, kohya_lora, unet_keys
from webui_harness import (BAD_INPUTS, check_bad_input_refused, check_interrupt_writes_nothing,
                           check_text_lora_merges, forget_folder, install_extension, pack_module, registered, require,
                           run_red_to_orange, tab_args)

A1111 = require("A1111_PATH", "gradio")
SD_ARGS = ["--use-cpu", "all", "--no-half", "--precision", "full", "--skip-torch-cuda-test",
           "--skip-version-check", "--no-download-sd-model", "--skip-load-model-at-start"]


@pytest.fixture(scope="module")
def a1111_paths(tmp_path_factory):
    """A1111's command line and import paths (its modules, ldm, sgm), set as webui.py sets them before
    anything else, without initialising the WebUI: cheap, for tests that need only A1111's classes. Every
    test of the module shares it, so modules.paths reads this --data-dir whichever test comes first."""
    work = tmp_path_factory.mktemp("a1111")
    os.environ.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      GRADIO_ANALYTICS_ENABLED="False")
    data, lora = work / "data", work / "data" / "models" / "Lora"
    ckpt = data / "models" / "Stable-diffusion" / "tiny_sd15.safetensors"
    sys.argv = ["webui.py", *SD_ARGS, "--data-dir", str(data), "--ckpt", str(ckpt), "--lora-dir", str(lora)]
    os.chdir(A1111)
    sys.path.insert(0, str(A1111))
    from modules import paths  # noqa: F401  (puts ldm and sgm on sys.path)
    return SimpleNamespace(work=work, data=data, lora=lora, ckpt=ckpt)


@pytest.fixture(scope="module")
def webui(a1111_paths):
    work, data, lora, ckpt = a1111_paths.work, a1111_paths.data, a1111_paths.lora, a1111_paths.ckpt
    ext = install_extension(data / "extensions")
    ckpt.parent.mkdir(parents=True)
    from sd15_shaped import clip_l_hub_cache, with_ldm
    clip_l_hub_cache(work / "hf")
    with_ldm(ckpt, A1111)
    from modules import initialize
    initialize.imports()
    initialize.initialize()
    from modules import script_callbacks
    script_callbacks.before_ui_callback()  # as webui.py does next: the Lora extension registers <lora:…>
    from modules import shared
    assert shared.sd_model is not None and shared.sd_model.is_sd1
    return SimpleNamespace(shared=shared, lora=lora, ext=ext, work=work)


@pytest.fixture(scope="module")
def tab(webui):
    """A1111's own ui_tabs_callback, as create_ui calls it: every registered tab, ours among them."""
    from modules import script_callbacks
    tabs = {elem_id: (blocks, title) for blocks, title, elem_id in script_callbacks.ui_tabs_callback()}
    assert "vdu_unlearn" in tabs, f"no Unlearn tab among {sorted(tabs)}"
    module = sys.modules["vdu_unlearn.vdu_webui.tab"]
    return SimpleNamespace(blocks=tabs["vdu_unlearn"][0], title=tabs["vdu_unlearn"][1], module=module)


def txt2img(shared, prompt: str, seed: int = 7) -> np.ndarray:
    """One image through A1111's own pipeline (processing, k-diffusion Euler, Lora extension)."""
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt="", seed=seed, steps=2, width=64, height=64,
        sampler_name="Euler", cfg_scale=5.0, do_not_save_samples=True, do_not_save_grid=True)
    return np.asarray(processing.process_images(p).images[0])


def test_the_script_loads_and_registers_the_unlearn_tab(webui, tab):
    """A1111's script loader imported scripts/vdu_unlearn_tab.py from the extensions folder."""
    from modules import scripts
    loaded = [s.path for s in scripts.list_scripts("scripts", ".py")]
    assert any(p.endswith("vdu_unlearn_tab.py") for p in loaded)
    assert tab.title == "Unlearn"
    assert registered(tab.blocks, "train") and registered(tab.blocks, "interrupt")


def test_a_run_from_the_tab_writes_the_lora_and_leaves_the_model_as_it_was(webui, tab, tmp_path):
    """Weights of the whole model and a txt2img image (same seed, prompt) bit-identical after."""
    from safetensors import safe_open
    model = webui.shared.sd_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = txt2img(webui.shared, "a red circle")
    t0 = time.perf_counter()
    args = tab_args(tab.module, folder=str(forget_folder(tmp_path)))
    gallery, curve, message = registered(tab.blocks, "train")(*args)
    print(f"tab run: {time.perf_counter() - t0:.1f} s")
    assert "saved" in message and "forget-red.safetensors" in message, message
    assert len(gallery) == 4 and curve is not None
    path = webui.lora / "forget-red.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["vdu_concept"] == "a red circle"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(image, txt2img(webui.shared, "a red circle"))


def test_the_lora_extension_matches_every_module_and_applies_it(webui, tab):
    """A1111's extensions-builtin/Lora: load_network maps every module of the file to a layer;
    `<lora:forget-red:1>` merges exactly up @ down · alpha/rank into that layer for the generation
    (a 3-step LoRA on a random model moves a 64-px image by less than 8-bit rounding, so the
    weights are compared, not the image); the next generation without it restores them."""
    from safetensors.torch import load_file
    networks = sys.modules["networks"]
    networks.list_available_networks()  # the Lora tab's refresh
    on_disk = networks.available_networks["forget-red"]
    net = networks.load_network("forget-red", on_disk)
    sd = load_file(on_disk.filename)
    assert {m.network_key.split(".")[0] for m in net.modules.values()} == {k.split(".")[0] for k in sd}
    layer = webui.shared.sd_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down, alpha = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"], float(sd[f"{key}.alpha"])
    w0 = layer.weight.detach().clone()
    plain = txt2img(webui.shared, "a red circle")
    txt2img(webui.shared, "a red circle <lora:forget-red:1>")
    torch.testing.assert_close(layer.weight.detach() - w0, up @ down * alpha / up.shape[1], rtol=1e-3, atol=1e-6)
    assert np.array_equal(plain, txt2img(webui.shared, "a red circle"))
    assert torch.equal(layer.weight.detach(), w0)


def test_a_one_word_concept_trains_a1111s_text_encoder_and_the_lora_extension_applies_it(webui, tab, tmp_path):
    """A one-word concept with a one-word anchor (the tab's fields): VDU trains deltas on A1111's own CLIP-L
    (text_remap.py) through the WebUI's prompt path and leaves the model's weights as they were; the Lora extension
    matches every key of the file, and `<lora:…:1>` applies it (webui_harness.check_text_lora_merges)."""
    shared = webui.shared
    clip = shared.sd_model.cond_stage_model.wrapped.transformer
    before = {k: v.clone() for k, v in shared.sd_model.state_dict().items()}
    sd = run_red_to_orange(tab, tmp_path, webui.lora, clip)
    assert all(torch.equal(before[k], v) for k, v in shared.sd_model.state_dict().items())
    networks = sys.modules["networks"]
    networks.list_available_networks()
    net = networks.load_network("red-to-orange", networks.available_networks["red-to-orange"])
    assert {m.network_key.split(".")[0] for m in net.modules.values()} == {k.split(".")[0] for k in sd}

    def encode(prompt):
        with torch.no_grad():
            return shared.sd_model.get_learned_conditioning([prompt]).float().clone()
    check_text_lora_merges(sd, clip, lambda prompt: txt2img(shared, prompt), encode)


def test_interrupt_mid_run_writes_nothing(webui, tab, tmp_path):
    check_interrupt_writes_nothing(webui, tab, tmp_path)


@pytest.mark.parametrize("values, words", BAD_INPUTS)
def test_bad_input_gives_a_message_and_no_file(webui, tab, tmp_path, values, words):
    check_bad_input_refused(webui, tab, tmp_path, values, words)


def test_install_py_run_by_a1111s_installer_keeps_torch(webui, capfd):
    """launch_utils.run_extension_installer, as A1111 runs it at start-up (its python, PYTHONPATH
    set to its folder so `launch` imports): nothing missing, nothing installed, torch unchanged."""
    from modules import launch_utils
    torch_before = importlib.metadata.version("torch")
    launch_utils.run_extension_installer(str(webui.ext))
    assert "[vdu-unlearn] all requirements present" in capfd.readouterr().out
    assert importlib.metadata.version("torch") == torch_before


CONFIG_DIRS = {"v1-inference.yaml": A1111 / "configs",
               "v2-inference-v.yaml": A1111 / "repositories" / "stable-diffusion-stability-ai" / "configs"
               / "stable-diffusion",
               "sd_xl_base.yaml": A1111 / "repositories" / "generative-models" / "configs" / "inference"}
ARCH_CONFIGS = {"sd15": "v1-inference.yaml", "sdxl": "sd_xl_base.yaml"}


def full_size_unet(config: str):
    """The full-size UNet of one of A1111's model configs (ldm's, or sgm's for SDXL), on the meta device."""
    import yaml
    from ldm.util import instantiate_from_config
    params = yaml.safe_load((CONFIG_DIRS[config] / config).read_text())["model"]["params"]
    with torch.device("meta"):
        return instantiate_from_config(params.get("unet_config") or params["network_config"])


@pytest.mark.parametrize("config", ["v1-inference.yaml", "v2-inference-v.yaml", "sd_xl_base.yaml"])
def test_full_size_unets_every_layer_maps_to_a1111s_names(webui, config):
    """Real SD 1.5 / 2.x / SDXL UNets from their own configs, on the meta device (no memory): every
    Linear and Conv2d the backend offers maps, through A1111's key conversion, onto its own layer.
    SDXL: A1111 assumes SD 1.5's up_blocks.0 (no attention), so that one upsampler does not map."""
    ldm_to_diffusers_names = pack_module("vdu_engine.ldm_backend").ldm_to_diffusers_names
    networks = sys.modules["networks"]
    unet = full_size_unet(config)
    names, layers = ldm_to_diffusers_names(unet), dict(unet.named_modules())
    missed = []
    for ldm, diff in names.items():
        if diff.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") and isinstance(
                layers.get(ldm), (torch.nn.Linear, torch.nn.Conv2d)):
            compvis = networks.convert_diffusers_name_to_compvis("lora_unet_" + diff.replace(".", "_"), False)
            if compvis != "diffusion_model_" + ldm.replace(".", "_"):
                missed.append(diff)
    assert missed == (["up_blocks.0.upsamplers.0.conv"] if config == "sd_xl_base.yaml" else [])


def _full_size_sd_model(arch: str):
    """What A1111 holds as shared.sd_model, for a full-size SD 1.5 / SDXL checkpoint, reduced to what the LDM
    backend and the Lora extension read: `model.diffusion_model` (the UNet from A1111's own config, on meta,
    inside a module as ldm's DiffusionWrapper holds it), the noise schedule, the text side left empty."""
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = full_size_unet(ARCH_CONFIGS[arch])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    model = SimpleNamespace(model=wrapper, alphas_cumprod=torch.cumprod(1 - betas, 0), parameterization="eps",
                            is_sdxl=arch == "sdxl", cond_stage_model=torch.nn.Module())
    if arch == "sdxl":
        model.conditioner = SimpleNamespace(embedders=[])
    return model


def _ldm_backend(model):
    return pack_module("vdu_engine.ldm_backend").LDMBackend(model, encode_prompts=lambda prompts: None)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_ldm_backend_gives_the_committed_keys(a1111_paths, arch):
    """Cross-host LoRAs, A1111's first half (the list: tests/lora_keys.py): the LDM backend on a full-size
    SD 1.5 / SDXL UNet from A1111's own configs (ldm's and sgm's classes, on meta) offers exactly the
    committed keys and shapes, so a LoRA made in A1111 has the keys of one made in ComfyUI, Forge or diffusers.
    No WebUI start: only A1111's paths (a1111_paths), for ldm and sgm."""
    assert unet_keys(_ldm_backend(_full_size_sd_model(arch)).targets()) == committed_keys(arch)


# Committed keys A1111's Lora extension does not match: its diffusers → compvis key conversion assumes SD 1.5's
# up_blocks.0 (no attention, so the upsampler at output_blocks.2.1); SDXL's up_blocks.0 has attention and its
# upsampler sits at output_blocks.2.2. That one layer of an SDXL LoRA is skipped by A1111 (silently, at debug level).
A1111_UNMATCHED = {"sd15": [], "sdxl": ["lora_unet_up_blocks_0_upsamplers_0_conv"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lora_extension_matches_every_committed_key_on_full_size_models(webui, arch, tmp_path, monkeypatch):
    """Cross-host LoRAs, A1111's second half: the engine's LoRA of every committed key, as a file, through the
    Lora extension's own load_network with a full-size SD 1.5 / SDXL model (on meta) as shared.sd_model: every
    key matches a layer (SDXL: all but A1111_UNMATCHED), and the layer each key matches is the one the LDM
    backend trains under that key. So LoRAs made in ComfyUI, Forge or diffusers load in A1111 with every key."""
    from safetensors.torch import save_file
    from modules import sd_models
    networks, network = sys.modules["networks"], sys.modules["network"]
    model = _full_size_sd_model(arch)
    targets = _ldm_backend(model).targets()
    committed = committed_keys(arch)
    assert unet_keys(targets) == committed
    path = tmp_path / f"all-layers-{arch}.safetensors"
    save_file(kohya_lora(targets), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl"
                                                        else "sd_v1", "ss_network_module": "networks.lora"})
    # the getter of shared.sd_model reads model_data.sd_model; setting that leaves A1111's loaded-model list alone
    monkeypatch.setattr(sd_models.model_data, "sd_model", model)
    networks.assign_network_names_to_compvis_modules(model)
    net = networks.load_network(path.stem, network.NetworkOnDisk(path.stem, str(path)))
    matched = {m.network_key.split(".")[0]: m.sd_module for m in net.modules.values()}
    assert len(matched) == len(net.modules)  # no two keys onto one layer
    assert sorted(set(committed) - set(matched)) == A1111_UNMATCHED[arch] and set(matched) <= set(committed)
    assert all(matched[t.key] is t.module for t in targets if t.key in matched)
