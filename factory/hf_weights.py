"""Hugging Face model folders are read from safetensors only.

A `pytorch_model.bin` is a pickle: loading one a user hands in (`factory bench DIR`, a
manifest's `base.path`) can run code, and transformers falls back to it whenever a folder has
no safetensors. Every place the factory loads HF weights goes through here: the folder must
hold safetensors (else one UserError naming the fix), and transformers is told to use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.stage import UserError

FIX = "convert it once where you trust it: `model.save_pretrained(dir)` writes safetensors"


def require_safetensors(folder: Path) -> list[Path]:
    """The folder's *.safetensors files; UserError when it holds none (pickles or nothing)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob(p) for p in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
        raise UserError(f"{folder}: only pickle weights (*.bin); the factory reads safetensors "
                        f"only (a pickle can run code when loaded): {FIX}")
    raise UserError(f"{folder}: no *.safetensors weights (not a Hugging Face model folder)")


def from_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, **kwargs)` from the folder's safetensors, never a pickle."""
    require_safetensors(folder)
    return cls.from_pretrained(folder, use_safetensors=True, **kwargs)
