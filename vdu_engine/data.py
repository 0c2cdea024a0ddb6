"""The forget set: images of the concept, with optional captions.

Images come from a folder (png, jpg, webp; any size and mode) or from tensors (a ComfyUI IMAGE
batch). They are kept at their own size until the run knows its resolution, then resized on
the shorter side and centre-cropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import VDUError, require_finite

log = logging.getLogger("vdu_engine")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white rather than whatever colour they hide."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class ForgetSet:
    """Images [3, H, W] in [0, 1] (sizes may differ) and their captions (None: use the concept)."""

    images: List[torch.Tensor]
    captions: List[Optional[str]]
    skipped: List[str] = field(default_factory=list)  # unreadable files, with the reason
    crop: str = "center"  # "center": shorter side to r, centre crop; "resize": squash to r × r

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, folder) -> "ForgetSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise VDUError(f"forget-image folder {folder} does not exist; "
                           "pass --images DIR with pictures of the concept")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise VDUError(f"no png/jpg/webp images in {folder}; add pictures of the concept or use --concept TEXT")
        images, captions, skipped = [], [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    arr = np.asarray(_to_rgb(im), dtype=np.float32) / 255.0
            except Exception as e:  # PIL raises many types for corrupt files
                skipped.append(f"{p.name} ({type(e).__name__})")
                continue
            images.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
            txt = p.with_suffix(".txt")
            captions.append(txt.read_text(encoding="utf-8").strip() or None if txt.exists() else None)
        if not images:
            raise VDUError(f"none of the {len(files)} images in {folder} could be read "
                           f"({', '.join(skipped[:3])}); check the files")
        if skipped:
            log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
        return cls(images, captions, skipped)

    @classmethod
    def from_tensor(cls, images: torch.Tensor, captions: Optional[List[Optional[str]]] = None,
                    channels_last: bool = True) -> "ForgetSet":
        """A batch [B, H, W, 3] (ComfyUI's IMAGE) or [B, 3, H, W] in [0, 1]."""
        if images.dim() != 4 or images.shape[0] == 0:
            raise VDUError("the forget images must be a non-empty batch of images")
        x = images.detach().float().clone()  # a normal tensor even if made in inference mode
        # clamp keeps nan, which the VAE's check would then pin on the VAE: name what made the images
        require_finite(x, "the forget images hold non-finite pixels (nan/inf) in {bad} of {total}",
                       "check what made them (a VAE decode in fp16 overflows; in ComfyUI, launch it with --fp32-vae)")
        x = x.permute(0, 3, 1, 2) if channels_last else x
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        captions = list(captions) if captions is not None else [None] * len(x)
        return cls([xi.clamp(0, 1) for xi in x], captions)

    def captions_for(self, concept: str) -> List[str]:
        """Each image's caption, the concept prompt where it has none."""
        captions = [c or concept for c in self.captions]
        if not all(c.strip() for c in captions):
            raise VDUError("some forget images have no .txt caption and no concept prompt was given; "
                           "pass --concept TEXT")
        return captions

    def pixels(self, resolution: int) -> torch.Tensor:
        """All images as one batch [N, 3, r, r] in [-1, 1], cropped or squashed per `crop`."""
        out = []
        for img in self.images:
            h, w = img.shape[1:]
            s = resolution / min(h, w)
            nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
            if self.crop == "resize":
                nh = nw = resolution
            x = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True,
                              align_corners=False) if (nh, nw) != (h, w) else img[None]
            top, left = (nh - resolution) // 2, (nw - resolution) // 2
            out.append(x[..., top:top + resolution, left:left + resolution])
        return torch.cat(out).clamp(0, 1) * 2 - 1
