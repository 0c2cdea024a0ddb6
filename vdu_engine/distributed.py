"""Several processes sharing one run (`accelerate launch`, torchrun): data parallel over the batch.

Every process draws the same global batch (same seed), trains on its own slice of it, and the
LoRA gradients are summed across processes before each optimizer step, so every process holds
the same factors and a run on N processes learns what one process learns (up to rounding).
The main process alone writes files. Without a launcher this is a world of one and costs nothing.
"""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist


class Workers:
    def __init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            from accelerate import PartialState
            PartialState()  # joins the process group the launcher describes (gloo on CPU, nccl on GPU)
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_gradients(self, params: List[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient and the step's statistics over the processes, in
        one collective. Returns the summed statistics."""
        if not self.active:
            return stats
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads] + [stats.to(grads[0].device, grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        return flat[offset:].to(stats)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The main process's tensor on every process (for values computed once, e.g. generated
        forget images, that must not differ by a rounding between processes)."""
        if self.active:
            dist.broadcast(tensor, src=0)
        return tensor

    def main_says(self, flag: bool) -> bool:
        """The main process's decision (e.g. a user's cancel), taken by every process."""
        if not self.active:
            return flag
        dist.broadcast_object_list(obj := [flag], src=0)
        return bool(obj[0])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
