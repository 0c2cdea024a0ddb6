"""Writing LoRA files: kohya metadata and an atomic write that never leaves a partial file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from .errors import VDUError


def check_output_path(path, overwrite: bool = False) -> Path:
    """Fail before any work if the LoRA could not be written there."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VDUError(f"output {path} must end in .safetensors; pass --out NAME.safetensors")
    if not path.parent.is_dir():
        raise VDUError(f"output directory {path.parent} does not exist; create it or pass another --out")
    if path.exists() and not overwrite:
        raise VDUError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    return path


def atomic_save_file(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None,
                     overwrite: bool = False) -> Path:
    """Write to a temporary file in the same directory, then rename over the target, so a
    crash or interruption leaves either the old state or the whole new file."""
    path = check_output_path(path, overwrite) if Path(path).suffix == ".safetensors" else Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if not overwrite and path.exists():
            raise VDUError(f"{path} appeared while writing; pass --overwrite to replace it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
