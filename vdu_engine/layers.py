"""Which layers a run adapts: named presets over diffusers module paths.

Presets match on the diffusers path so they mean the same thing for every backend
(a ComfyUI backend reports diffusers paths too; see backend.AdaptTarget).
"""

from __future__ import annotations

import re
from typing import List

from .backend import AdaptTarget

_ATTN_PROJ = r"\.(to_q|to_k|to_v|to_out\.0)$"
PRESETS = {
    # The cross-attention keys and values: they see only the prompt's token embeddings, so a delta
    # there changes an image only through the words of its prompt (UCE's and SPEED's choice).
    "cross_attention_kv": re.compile(r"\.attn2\.(to_k|to_v)$"),
    # Every cross-attention projection (ESD-x's choice).
    "cross_attention": re.compile(r"\.attn2" + _ATTN_PROJ),
    # Self- and cross-attention projections.
    "attention": re.compile(r"\.attn[12]" + _ATTN_PROJ),
    # Attention plus the transformer blocks' feed-forward layers.
    "attention_ff": re.compile(r"(\.attn[12]" + _ATTN_PROJ + r")|(\.ff\.net\.(0\.proj|2)$)"),
    # Every Linear and Conv2d of the UNet, resnets and samplers included (ESD-u-like).
    "all": re.compile(r".*"),
}
DEFAULT_PRESET = "cross_attention_kv"  # chosen on the quality benchmark (docs/quality/tuning.md)


def select_targets(targets: List[AdaptTarget], preset: str,
                   train_text_encoder: bool = False) -> List[AdaptTarget]:
    """The targets a preset names; text-encoder layers only when asked for."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; choose one of {', '.join(PRESETS)}")
    pattern = PRESETS[preset]
    chosen = [t for t in targets if t.component == "unet" and pattern.search(t.path)]
    if train_text_encoder:
        chosen += [t for t in targets if t.component != "unet"]
    return chosen
