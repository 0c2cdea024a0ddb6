"""Memory options of a run: precision, gradient checkpointing, micro-batches, encoder offload.

None of them changes what is learned beyond floating-point rounding: a step's batch is drawn
whole and then split (micro-batches, processes), checkpointing recomputes the same forward, and
the LoRA factors and their optimizer state stay float32 under any precision. `--memory` names a
combination; explicit flags win over it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.utils.checkpoint
from torch import nn

# What each preset sets (fields of UnlearnConfig). Precision stays `auto` in every preset: half on
# a GPU, fp32 on a CPU, where bf16 was ~47x slower (benchmarks.speed, README). CPU numbers on the
# SD 1.5-shaped model: micro-batch 1 cost 2 % time for 33 % less run memory; checkpointing 39 % time
# for 37 % less. GPU numbers are not measured yet.
MEMORY_PRESETS = {
    # Nothing saved: the fastest step.
    "fast": {},
    # One image per pass and encoders off the accelerator: much less activation memory, little time.
    "balanced": dict(offload_encoders=True, micro_batch_size=1),
    # Also recompute activations in the backward pass: the least memory, the slowest.
    "low": dict(offload_encoders=True, micro_batch_size=1, gradient_checkpointing=True),
}
PRECISIONS = ("auto", "fp32", "half", "bf16", "fp16")

# Block classes whose forward is checkpointed as a unit: diffusers' and ComfyUI's (LDM) names.
CHECKPOINT_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "ResBlock")


def autocast_dtype(precision: str, device: torch.device, model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype the frozen model's forward is autocast to, or None for no autocast.

    auto: half precision on a CUDA GPU (bf16 where supported), float32 on the CPU, where bf16
    matmuls are slower than float32 on most processors (see the speed benchmark). A model that is
    already loaded in half precision runs as it is."""
    if precision == "auto":
        precision = "half" if device.type == "cuda" else "fp32"
    if model_dtype != torch.float32 or precision == "fp32":
        return None
    if precision == "half":
        bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def checkpoint_blocks(root: nn.Module) -> List[nn.Module]:
    return [m for m in root.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]


@contextmanager
def checkpointed(blocks: List[nn.Module]) -> Iterator[None]:
    """Gradient checkpointing by wrapping each block's forward for the duration of the run.

    The blocks belong to the user's model: the wrapper is an instance attribute, removed after,
    so the model's class, flags and behaviour outside the run are untouched. LoRA hooks fire
    inside the recomputed forward with the step's fixed factors, so the recomputation matches."""
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextmanager
def temporarily(items, read, write, value) -> Iterator[None]:
    """`write(item, value)` on each item for the block, then write back what `read(item)` gave."""
    saved = [read(x) for x in items]
    for x in items:
        write(x, value)
    try:
        yield
    finally:
        for x, old in zip(items, saved):
            write(x, old)


def modules_on(modules: List[nn.Module], device):
    """Move modules to `device` for the block and back to where each was after it."""
    return temporarily(modules, lambda m: next(m.parameters()).device, lambda m, d: m.to(d), device)


def split(n: int, parts: int) -> List[slice]:
    """`n` items into `parts` contiguous slices of near-equal size (the first ones larger)."""
    q, r = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
