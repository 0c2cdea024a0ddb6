"""Low-rank deltas attached to a frozen model with forward hooks.

Hooks (not module surgery, not peft injection) keep the user's model object untouched: the
layers are the user's own, a delta is added to their output while `attached()` is active, and
removing the hooks restores the model bit for bit. The same code serves every backend, since a
ComfyUI Linear and a diffusers Linear are both `nn.Linear` to a hook.

Each delta is ΔW = (alpha / rank) · up @ down, kohya's parameterisation, so the trained factors
are written to the LoRA file as they are. With `variational=True` each factor is a mean-field
Gaussian (mean, log-std); a forward pass draws one reparameterised sample, export writes the mean.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch import nn

from .backend import AdaptTarget


class LoRALayer(nn.Module):
    def __init__(self, target: AdaptTarget, rank: int, alpha: float, variational: bool,
                 init_log_std: float, generator: torch.Generator):
        super().__init__()
        m = target.module
        self.is_conv = isinstance(m, nn.Conv2d)
        if self.is_conv:
            if m.groups != 1:
                raise ValueError(f"grouped convolution {target.key} cannot take a LoRA")
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            down_shape = (rank, m.in_channels, *m.kernel_size)
            up_shape = (m.out_channels, rank, 1, 1)
            self.conv_args = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
        else:
            fan_in = m.in_features
            down_shape, up_shape = (rank, m.in_features), (m.out_features, rank)
        # kohya's init: down ~ kaiming-uniform, up = 0, so training starts at ΔW = 0.
        bound = 1.0 / math.sqrt(fan_in)
        down = (torch.rand(down_shape, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(up_shape))
        self.variational = variational
        if variational:
            self.down_log_std = nn.Parameter(torch.full(down_shape, init_log_std))
            self.up_log_std = nn.Parameter(torch.full(up_shape, init_log_std))
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.weight_shape = tuple(m.weight.shape)

    def factors(self, noise: torch.Generator):
        """(down, up) for this forward: the means, or one reparameterised sample."""
        if self.variational and self.training:
            draw = lambda p: torch.randn(p.shape, generator=noise).to(p)
            return (self.down + self.down_log_std.exp() * draw(self.down),
                    self.up + self.up_log_std.exp() * draw(self.up))
        return self.down, self.up

    def delta_output(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        x = x.to(down.device, down.dtype)  # a host may keep a text encoder on another device than the UNet
        if self.is_conv:
            return F.conv2d(F.conv2d(x, down, **self.conv_args), up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale

    def delta_weight(self, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """ΔW in the layer's weight shape."""
        w = (up.flatten(1) @ down.flatten(1)) * self.scale
        return w.view(self.weight_shape)

    def entropy(self) -> torch.Tensor:
        """Entropy of the mean-field posterior over the factors, up to a constant."""
        if not self.variational:
            return torch.zeros(())
        return self.down_log_std.sum() + self.up_log_std.sum()


class LoRANetwork(nn.Module):
    """All deltas of one run. `attached()` hooks them into the model; `deltas()` gives the
    ΔW of the current sample for the prior term, consistent with the forward pass."""

    def __init__(self, targets: List[AdaptTarget], rank: int, alpha: float,
                 variational: bool = False, init_log_std: float = -7.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.targets = {t.key: t for t in targets}
        self.layers = nn.ModuleDict(
            {t.key: LoRALayer(t, rank, alpha, variational, init_log_std, g) for t in targets})
        self.enabled = True
        # Its own generator: every process of a multi-process run draws the same sample.
        self._noise = torch.Generator().manual_seed(seed + 1)
        self._current: Dict[str, tuple] = {}

    def resample(self) -> None:
        """Draw this step's factors (one sample per step, shared by the batch)."""
        self._current = {k: layer.factors(self._noise) for k, layer in self.layers.items()}

    def current_factors(self) -> Dict[str, tuple]:
        """key → (down, up) of the current sample: what the forward pass uses (prior term)."""
        if not self._current:
            self.resample()
        return self._current

    def forget_sample(self) -> None:
        """Drop the current sample: later forwards use the means (export, sampling)."""
        self._current = {}

    def deltas(self) -> Dict[str, torch.Tensor]:
        return {k: self.layers[k].delta_weight(*f) for k, f in self.current_factors().items()}

    def _hook(self, key: str):
        layer = self.layers[key]

        def hook(module, inputs, output):
            if not self.enabled:
                return output
            down, up = self._current[key] if key in self._current else layer.factors(self._noise)
            return output + layer.delta_output(inputs[0], down, up).to(output.device, output.dtype)
        return hook

    @contextmanager
    def attached(self) -> Iterator["LoRANetwork"]:
        handles = [t.module.register_forward_hook(self._hook(k)) for k, t in self.targets.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The frozen model's outputs (for objectives whose targets come from it)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def entropy(self) -> torch.Tensor:
        return sum((layer.entropy() for layer in self.layers.values()), torch.zeros(()))

    def kohya_state_dict(self) -> Dict[str, torch.Tensor]:
        """The mean factors in kohya layout: down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
        sd = {}
        for key, layer in self.layers.items():
            sd[f"{key}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            sd[f"{key}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            sd[f"{key}.alpha"] = torch.tensor(layer.alpha)
        return sd

    def load_kohya_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        for key, layer in self.layers.items():
            layer.down.data.copy_(sd[f"{key}.lora_down.weight"].view_as(layer.down))
            layer.up.data.copy_(sd[f"{key}.lora_up.weight"].view_as(layer.up))
