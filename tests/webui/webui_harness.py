"""What the A1111 and Forge suites share: finding the checkout, the forget images, the tab's
registered handlers, the tab's inputs with test-sized values, and the checks both suites run."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
import types
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[2]
REASONS = {
    "A1111_PATH": "A1111 tests need A1111_PATH (an A1111 v1.10 checkout) and its venv .venv-a1111: "
                  "run `make test`, or tools/setup_webui.sh a1111",
    "FORGE_PATH": "Forge tests need FORGE_PATH (a Forge checkout) and its venv .venv-forge: "
                  "run `make test`, or tools/setup_webui.sh forge",
}


def require(var: str, module: str) -> Path:
    """The checkout named by `var`, or skip the calling test module with the reason: no checkout,
    or not the WebUI's venv (its pinned gradio and transformers 4.x must be importable)."""
    path = os.environ.get(var)
    if not path or not Path(path, "modules", "script_callbacks.py").exists():
        pytest.skip(REASONS[var], allow_module_level=True)
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{REASONS[var]} ({module} is not importable here)", allow_module_level=True)
    return Path(path)


def install_extension(extensions_dir: Path) -> Path:
    """The pack, linked into the WebUI's extensions folder as a user would clone it."""
    extensions_dir.mkdir(parents=True, exist_ok=True)
    link = extensions_dir / "vdu-unlearn"
    if not link.exists():
        link.symlink_to(PACK, target_is_directory=True)
    return link


def pack_module(name: str):
    """A module of the pack as the WebUI imports it, `vdu_unlearn.<name>`, without starting the WebUI:
    the pack's folder registered as the package vdu_unlearn, as scripts/vdu_unlearn_tab.py does."""
    if "vdu_unlearn" not in sys.modules:
        pkg = types.ModuleType("vdu_unlearn")
        pkg.__path__ = [str(PACK)]
        sys.modules["vdu_unlearn"] = pkg
    return importlib.import_module(f"vdu_unlearn.{name}")


def forget_folder(path: Path, n: int = 4) -> Path:
    from PIL import Image, ImageDraw
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (72, 64), (90 + 20 * i, 90, 90))
        ImageDraw.Draw(img).ellipse((16, 12, 56, 52), fill=(220, 20 + 10 * i, 30))
        img.save(path / f"red{i}.png")
    return path


def registered(blocks, name: str):
    """The function a Blocks wired to an event, by its name (gradio 3 keeps a list, 4 a dict)."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    for f in fns:
        if getattr(f.fn, "__name__", "") == name:
            return f.fn
    raise AssertionError(f"no handler named {name!r} in the tab")


def tab_args(tab_module, **values) -> list:
    """The Train handler's arguments: the task id the tab's JavaScript makes, then every input in
    the tab's order, test-sized (64 px, 2 sampler steps, 2 prior images) unless given."""
    base = dict(folder="", concept="a red circle", anchor="", keep="", objective="vdu", steps=3, rank=2, lr=1e-2,
                memory="fast", seed=0, name="forget-red", overwrite=False, retained="a blue square",
                resolution=64, num_images=2, sample_steps=2, fisher_samples=2, prior="isotropic",
                preview_steps=2, forget_prompts="", text_destination=True, text_steps=2)
    base.update(values)
    return ["task(vdu-test)"] + [base[k] for k in tab_module.INPUTS]


def lora_files(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


BAD_INPUTS = [
    ({"folder": "EMPTY"}, "no png/jpg/webp images"),
    ({"folder": "", "concept": ""}, "nothing to forget"),
    ({"name": "../escaped"}, "escapes the LoRA folder"),
]


def check_interrupt_writes_nothing(webui, tab, tmp_path) -> None:
    """The tab's Interrupt (shared.state.interrupt) pressed while training: a message, no file."""
    train, stop = registered(tab.blocks, "train"), registered(tab.blocks, "interrupt")
    state, out = webui.shared.state, {}
    state.sampling_step, state.job = 0, ""
    args = tab_args(tab.module, folder=str(forget_folder(tmp_path)), steps=400, name="interrupted")
    worker = threading.Thread(target=lambda: out.setdefault("r", train(*args)))
    worker.start()
    deadline = time.time() + 600
    while not (state.job == args[0] and state.sampling_step >= 1) and time.time() < deadline and worker.is_alive():
        time.sleep(0.2)
    stop()
    worker.join(600)
    message = out["r"][2]
    assert "interrupted at step" in message and "nothing was written" in message, message
    assert not any(n.startswith("interrupted") or n.endswith(".tmp") for n in lora_files(webui.lora))


def check_bad_input_refused(webui, tab, tmp_path, values, words) -> None:
    """An empty folder, an empty concept, a name escaping the LoRA folder: refused before any work."""
    if values.get("folder") == "EMPTY":
        (tmp_path / "empty").mkdir()
        values = {**values, "folder": str(tmp_path / "empty")}
    files = lora_files(webui.lora.parent)
    values = {"name": "refused", **values}  # a name no earlier test wrote
    _, _, message = registered(tab.blocks, "train")(*tab_args(tab.module, **values))
    assert words in message, message
    assert lora_files(webui.lora.parent) == files


def run_red_to_orange(tab, tmp_path, lora_folder: Path, clip) -> dict:
    """The tab's run of a one-word concept with a one-word anchor (`red` → `orange`, 4 text-encoder steps at lr
    1e-3), which trains the text encoder: the file's tensors, after checking that it holds text-encoder keys only
    and that the run left the CLIP's weights as they were."""
    import torch
    from safetensors.torch import load_file
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    args = tab_args(tab.module, folder=str(forget_folder(tmp_path)), concept="red", anchor="orange", lr=1e-3,
                    text_steps=4, name="red-to-orange")
    _, _, message = registered(tab.blocks, "train")(*args)
    assert "saved" in message, message
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    sd = load_file(str(lora_folder / "red-to-orange.safetensors"))
    assert sd and all(k.startswith("lora_te_text_model_encoder_layers_") for k in sd)
    return sd


def check_text_lora_merges(sd: dict, clip, generate, encode) -> None:
    """`<lora:red-to-orange:1>` in a generation merges exactly up @ down · alpha/rank into the CLIP's first q_proj
    (to one rounding step of its weight's dtype); while merged, "a red circle" encodes nearer "a orange circle";
    the next generation without it restores the weights and the encoding bit for bit. `generate(prompt)` runs
    the WebUI's txt2img, `encode(prompt)` its prompt path."""
    import torch
    caption, goal = encode("a red circle"), encode("a orange circle")
    layer = clip.text_model.encoder.layers[0].self_attn.q_proj
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up, down, alpha = (sd[f"{key}.lora_up.weight"].float(), sd[f"{key}.lora_down.weight"].float(),
                       float(sd[f"{key}.alpha"]))
    w0 = layer.weight.detach().clone()
    generate("a red circle <lora:red-to-orange:1>")
    step = w0.abs().max().item() * torch.finfo(w0.dtype).eps  # Forge keeps CLIP in fp16
    torch.testing.assert_close((layer.weight.detach() - w0).float(), up @ down * alpha / up.shape[1], rtol=1e-2,
                               atol=max(step, 1e-6))
    moved = encode("a red circle")  # the merge stays until the next generation without the LoRA
    assert (moved - goal).pow(2).mean() < 0.95 * (caption - goal).pow(2).mean()
    generate("a red circle")
    assert torch.equal(layer.weight.detach(), w0)
    assert torch.equal(encode("a red circle"), caption)
