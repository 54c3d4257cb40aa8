"""Whole-folder conversions behind `factory convert`: a Hugging Face folder <-> a Megatron
checkpoint folder laid out like pretrain/ (so export, evaluate and a resumed run read it):

    model.json                          factory.train.models.ModelConfig
    checkpoints/iter_0000000/model/     dist_checkpointing of model.sharded_state_dict()
    checkpoints/latest.txt              "0"
    tokenizer/                          the HF folder's tokenizer files, when it has them

Both directions check everything they can (architecture, shapes, vocabulary) before any weight
is loaded, and run at TP=1 in this process: dist_checkpointing reshards to any TP on load.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from factory.hf_weights import require_safetensors
from factory.stage import UserError

log = logging.getLogger(__name__)

STEP = 0


def hf_to_megatron(src: Path, dst: Path) -> dict:
    """Convert the HF folder `src` into the Megatron folder `dst`; returns a summary."""
    from factory.train import checkpoint, parallel
    from factory.train.convert import TOKENIZER_FILES, load_hf_into_megatron
    from factory.train.models import build_model, config_from_hf, count_parameters

    src, dst = Path(src), Path(dst)
    _fresh_destination(dst)
    cfg = config_from_hf(src)               # architecture errors before any weight is read
    check_embedding_rows(src, cfg.vocab_size)
    parallel.init(solo=True)
    model = build_model(cfg)
    load_hf_into_megatron(model, src, cfg)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save(tmp / "model.json")
    _save_model(checkpoint.iter_dir(tmp / "checkpoints", STEP) / "model", model)
    (tmp / "checkpoints" / checkpoint.LATEST).write_text(f"{STEP}\n")
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if copied:
        (tmp / "tokenizer").mkdir()
        for name in copied:
            shutil.copyfile(src / name, tmp / "tokenizer" / name)
    tmp.rename(dst)
    log.info("wrote %s (%s, %d parameters)", dst, cfg.family, count_parameters(model))
    return {"family": cfg.family, "parameters": count_parameters(model),
            "tokenizer": bool(copied)}


def megatron_to_hf(src: Path, dst: Path, tokenizer: Path | None = None) -> dict:
    """Convert the Megatron folder `src` (a `factory convert` output or a pretrain/ folder)
    into a plain HF folder `dst` (config, model.safetensors, tokenizer files)."""
    from factory.train import parallel
    from factory.train.convert import save_hf
    from factory.train.export import load_checkpoint_model, newest_checkpoint
    from factory.train.models import ModelConfig, count_parameters

    src, dst = Path(src), Path(dst)
    _fresh_destination(dst)
    cfg = ModelConfig.load(src / "model.json")
    step, _ = newest_checkpoint(src)
    if tokenizer is None and (src / "tokenizer").is_dir():
        tokenizer = src / "tokenizer"
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise UserError(f"--tokenizer {tokenizer}: no such folder")
    parallel.init(solo=True)
    model = load_checkpoint_model(src).eval()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, cfg, tokenizer, tmp)
    tmp.rename(dst)
    if tokenizer is None:
        log.warning("%s has no tokenizer/ and none was given: the HF folder has no tokenizer",
                    src)
    return {"family": cfg.family, "parameters": count_parameters(model), "step": step,
            "tokenizer": tokenizer is not None}


def check_embedding_rows(folder: Path, vocab_size: int) -> None:
    """The word-embedding rows of a HF folder's safetensors must be config.json's vocab_size
    (read from the file header, no weights loaded)."""
    import json

    from safetensors import safe_open

    files = require_safetensors(folder)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(("embeddings.word_embeddings.weight", "embed_tokens.weight")):
                    rows = f.get_slice(key).get_shape()[0]
                    if rows != vocab_size:
                        raise UserError(
                            f"{folder}: {key} has {rows} rows but config.json says vocab_size "
                            f"{vocab_size}; fix config.json (or the vocabulary extension)")
                    return
    raise UserError(f"{folder}: no word-embedding tensor in "
                    f"{json.dumps([p.name for p in files])}")


def _save_model(folder: Path, model) -> None:
    from megatron.core import dist_checkpointing

    folder.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))


def _fresh_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: already exists and is not empty; choose a new folder")
    if dst.is_dir():
        dst.rmdir()
