"""Unified Concept Editing: a closed-form edit of the cross-attention key/value projections,
exported as a low-rank kohya LoRA.

Gandikota et al., "Unified Concept Editing in Diffusion Models" (WACV 2024), edit every UNet
`attn2.to_k` / `attn2.to_v` weight W (the only UNet layers that read the prompt) so that the
concept's token embeddings c_i are projected where the anchor's embeddings c*_i were, while
preserved embeddings p_j keep their projections:

    W' = argmin Σ_i ‖W' c_i − W c*_i‖² + λ_p Σ_j ‖W' p_j − W p_j‖² + λ ‖W' − W‖²_F
       = (W Σ c*_i c_iᵀ + λ_p W Σ p_j p_jᵀ + λ W) (Σ c_i c_iᵀ + λ_p Σ p_j p_jᵀ + λ I)^{-1}.

Subtracting W·B (B the matrix inverted above) from both sides gives the edit itself,
ΔW = W (C* − C)ᵀ C B^{-1}, with C, C* the stacked erase/anchor embeddings. Working with ΔW
rather than W' − W avoids cancellation, and shows two things the code relies on: B, and so
the one linear solve, is the same for every layer (they all read the same context), and
rank ΔW ≤ rows of C, which is usually far below the layer's size, so its SVD can be taken
on thin factors instead of the full matrix.

Embeddings are paired by token position over the whole padded context (the backend pads every
prompt to the same length L): that covers the concept's words, its final token and the padding
after it, which carry the prompt's meaning in CLIP's causal encoder, without counting tokens.
Positions where the two prompts agree (start token, a shared prefix) give c_i = c*_i and so
ask the edit to leave them alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .backend import AdaptTarget, Backend
from .errors import VDUError
from .lora import LoRANetwork

_KV = re.compile(r"\.attn2\.to_[kv]$")
_ENCODE_CHUNK = 32  # prompts per text-encoder call: bounds memory for long preserve lists


@dataclass
class UCEResult:
    network: LoRANetwork  # holds the truncated factors, ready for .kohya_state_dict() / .attached()
    truncation_error: Dict[str, float]  # per layer key: ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F (0 when ΔW is 0)


def uce_targets(targets: List[AdaptTarget]) -> List[AdaptTarget]:
    """The UNet's cross-attention key and value projections: the layers whose input is the
    text context, so an edit of them is a function of the prompt embeddings alone."""
    return [t for t in targets if t.component == "unet" and _KV.search(t.path)]


def _edit_map(c: torch.Tensor, c_star: torch.Tensor, p: torch.Tensor, preserve_scale: float,
              lamb: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D, V) with ΔW = (W Dᵀ) Vᵀ for any W: D = C* − C [N, in], V = B^{-1} Cᵀ [in, N].
    B is symmetric, so B^{-1} Cᵀ = (C B^{-1})ᵀ and one solve serves every layer."""
    eye = torch.eye(c.shape[1], dtype=c.dtype, device=c.device)
    normal = c.T @ c + preserve_scale * (p.T @ p) + lamb * eye
    try:
        v = torch.linalg.solve(normal, c.T)
    except torch.linalg.LinAlgError:
        raise VDUError("the UCE system is singular: raise lamb above 0 or add preserve prompts") from None
    return c_star - c, v


def closed_form(W: torch.Tensor, c: torch.Tensor, c_star: torch.Tensor, p: torch.Tensor,
                preserve_scale: float, lamb: float) -> torch.Tensor:
    """The edited weight W' [out, in] in float64 (module docstring); c, c_star [N, in], p [M, in]."""
    W, c, c_star, p = (x.detach().to(torch.float64) for x in (W, c, c_star, p))
    d, v = _edit_map(c, c_star, p, preserve_scale, lamb)
    return W + (W @ d.T) @ v.T


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, alpha: float):
    """kohya factors of the best rank-`rank` approximation (Eckart–Young) of u·diag(s)·vh."""
    total = float((s ** 2).sum())
    err = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
    k = min(rank, s.shape[0])
    # Each side takes sqrt(S / scale), so scale·up@down = U S Vᵀ with factors of equal size,
    # which is how kohya-trained files look and keeps float32 storage well conditioned.
    root = (s[:k] / (alpha / rank)).sqrt()
    down = torch.zeros(rank, vh.shape[1], dtype=s.dtype, device=s.device)
    up = torch.zeros(u.shape[0], rank, dtype=s.dtype, device=s.device)
    down[:k] = root[:, None] * vh[:k]
    up[:, :k] = u[:, :k] * root
    return down, up, err


def low_rank(delta: torch.Tensor, rank: int, alpha: float) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(down [rank, in], up [out, rank], ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F) with (alpha/rank)·up@down ≈ delta,
    by truncated SVD. A rank above min(out, in) pads with zero rows/columns."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, rank, alpha)


def _product_svd(a: torch.Tensor, b: torch.Tensor):
    """Thin SVD of a @ bᵀ (a [out, k], b [in, k]). With k < min(out, in) it works on the
    k×k core of two QR factorisations instead of the out×in product."""
    k = a.shape[1]
    if k >= min(a.shape[0], b.shape[0]):
        return torch.linalg.svd(a @ b.T, full_matrices=False)
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, vh @ qb.T


def _contexts(backend: Backend, prompts: List[str]) -> torch.Tensor:
    """[len(prompts), L, D] contexts, as the cross-attention reads them."""
    with torch.no_grad():
        parts = [backend.encode_text(prompts[i:i + _ENCODE_CHUNK])["context"].detach()
                 for i in range(0, len(prompts), _ENCODE_CHUNK)]
    return torch.cat(parts)


def _compute_device(weight: torch.Tensor) -> torch.device:
    # float64 is needed for the solve; MPS has none, so anything but CUDA computes on the CPU.
    return weight.device if weight.device.type == "cuda" else torch.device("cpu")


def uce_edit(backend: Backend, targets: List[AdaptTarget], erase_prompts: List[str], anchor_prompts: List[str],
             preserve_prompts: List[str], rank: int, alpha: float, preserve_scale: float = 1.0,
             lamb: float = 0.1, seed: int = 0) -> UCEResult:
    """UCE on the cross-attention key/value layers among `targets` (others are ignored, since
    UCE does not define an edit for them), as a LoRA of `rank`. The model is only read."""
    if not erase_prompts:
        raise VDUError("UCE needs at least one erase prompt: pass the concept's prompt(s)")
    if len(erase_prompts) != len(anchor_prompts):
        raise VDUError(f"UCE pairs each erase prompt with an anchor: got {len(erase_prompts)} erase and "
                       f"{len(anchor_prompts)} anchor prompts; pass one anchor per erase prompt")
    if rank < 1 or alpha <= 0:
        raise VDUError(f"UCE needs rank ≥ 1 and alpha > 0 (got rank {rank}, alpha {alpha})")
    if preserve_scale < 0 or lamb < 0:
        raise VDUError(f"preserve_scale and lamb must be ≥ 0 (got {preserve_scale}, {lamb})")
    chosen = uce_targets(targets)
    if not chosen:
        raise VDUError("no UNet attn2.to_k / attn2.to_v layer among the targets: pass the backend's targets()")

    erase = _contexts(backend, list(erase_prompts))
    anchor = _contexts(backend, list(anchor_prompts))
    preserve = (_contexts(backend, list(preserve_prompts)) if preserve_prompts
                else erase.new_zeros((0, *erase.shape[1:])))
    if anchor.shape[1:] != erase.shape[1:] or preserve.shape[1:] != erase.shape[1:]:
        raise VDUError("the backend returned contexts of different lengths; UCE pairs tokens by position "
                       "and needs every prompt padded to the same length")
    dim = erase.shape[-1]
    for t in chosen:
        # duck-typed: Forge's Linear (backend/operations.py) has in_features and a weight but is no nn.Linear
        if getattr(t.module, "in_features", None) != dim or getattr(t.module, "weight", None) is None:
            raise VDUError(f"{t.key} does not read the {dim}-wide text context; pass this model's own targets")

    maps: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}  # one solve per compute device
    factors, errors = {}, {}
    for t in chosen:
        dev = _compute_device(t.module.weight)
        if dev not in maps:
            c, c_star, p = (x.reshape(-1, dim).to(dev, torch.float64) for x in (erase, anchor, preserve))
            maps[dev] = _edit_map(c, c_star, p, preserve_scale, lamb)
        d, v = maps[dev]
        # copy=True: a float64 weight would otherwise be aliased, and nothing here may touch it.
        w = t.module.weight.detach().to(dev, torch.float64, copy=True)
        down, up, errors[t.key] = _truncate(*_product_svd(w @ d.T, v), rank, alpha)
        factors[t.key] = (down, up)

    network = LoRANetwork(chosen, rank, alpha, seed=seed)
    with torch.no_grad():
        for key, (down, up) in factors.items():
            network.layers[key].down.copy_(down.float())
            network.layers[key].up.copy_(up.float())
    return UCEResult(network.to(backend.device), errors)
