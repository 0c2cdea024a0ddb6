"""Before/after grids: the same prompts and seeds without and with a LoRA."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from .backend import Backend
from .errors import VDUError
from .lora import LoRANetwork
from .sampling import ddim_sample


def load_lora(backend: Backend, path, strength: float = 1.0) -> LoRANetwork:
    """A kohya LoRA file as hooks on this backend's layers (the engine's own loader, so what
    the grid shows is exactly what training optimised)."""
    sd = load_file(str(path))
    keys = sorted({k.split(".")[0] for k in sd})
    by_key = {t.key: t for t in backend.targets()}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise VDUError(f"{path} has {len(unknown)} layer(s) this model lacks (e.g. {unknown[0]}); "
                       "was it trained on another architecture?")
    rank = sd[f"{keys[0]}.lora_down.weight"].shape[0]
    alpha = float(sd.get(f"{keys[0]}.alpha", torch.tensor(float(rank))))
    net = LoRANetwork([by_key[k] for k in keys], rank, alpha).to(backend.device)
    net.load_kohya_state_dict({k: v * strength if k.endswith("lora_up.weight") else v for k, v in sd.items()})
    net.eval()
    return net


def to_pil_grid(rows: List[torch.Tensor], row_labels: List[str], col_labels: List[str]) -> Image.Image:
    """rows: each [N, 3, H, W] in [0, 1]; a label strip above the columns and left of the rows."""
    h, w = rows[0].shape[2:]
    scale = max(1, 128 // max(h, w))  # tiny models render 32 px images: enlarge to be visible
    cw, ch, pad_l, pad_t = w * scale, h * scale, 110, 28
    grid = Image.new("RGB", (pad_l + cw * rows[0].shape[0], pad_t + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((pad_l + j * cw + 3, 4), label[:max(4, cw // 6)], fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        draw.text((4, pad_t + i * ch + ch // 2 - 6), label[:18], fill="black")
        for j, img in enumerate(row):
            arr = (img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (pad_l + j * cw, pad_t + i * ch))
    return grid


@torch.no_grad()
def before_after_grid(backend: Backend, lora_path, prompts: List[str], seed: int = 0, per_prompt: int = 1,
                      steps: int = 20, guidance: float = 7.5, resolution: Optional[int] = None,
                      strength: float = 1.0) -> Image.Image:
    cols = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + i for _ in prompts for i in range(per_prompt)]
    kw = dict(steps=steps, guidance=guidance, resolution=resolution, seeds=seeds)
    before = ddim_sample(backend, cols, seed, **kw)
    with load_lora(backend, lora_path, strength).attached():
        after = ddim_sample(backend, cols, seed, **kw)
    return to_pil_grid([before, after], ["without LoRA", "with LoRA"], cols)
