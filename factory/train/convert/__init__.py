"""Hugging Face <-> megatron-core weights for the two families (TP=1 full state dicts).

Each family module (hf_bert.py, hf_llama.py) is an explicit key map with two pure functions,
`hf_to_megatron(hf_state, cfg)` and `megatron_to_hf(state, cfg)`, plus `hf_config(cfg, ids)`.
This module reads and writes the files: safetensors only, never pickles.

Vocabulary padding: importing pads the embedding rows (and BERT's MLM bias) up to
cfg.padded_vocab_size; exporting keeps them, so the exported config says
vocab_size = padded_vocab_size and HF's logits equal megatron's column for column.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from factory.hf_weights import require_safetensors
from factory.stage import UserError
from factory.train.models import ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")


# --- layout helpers shared by the family maps ---------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """megatron's fused QKV rows: per query group [q heads of the group..., k, v].

    Works for weights [rows, h] and biases [rows]. With groups == heads (MHA, BERT) this is
    per head [q_h, k_h, v_h].
    """
    d = q.shape[0] // heads
    rest = q.shape[1:]
    per_group = heads // groups
    return torch.cat([q.reshape(groups, per_group * d, *rest),
                      k.reshape(groups, d, *rest),
                      v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, heads: int, groups: int, head_dim: int):
    """The inverse of fuse_qkv: (q [heads*d, ...], k [groups*d, ...], v [groups*d, ...])."""
    rest = qkv.shape[1:]
    d, per_group = head_dim, heads // groups
    x = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q = x[:, :per_group * d].reshape(heads * d, *rest)
    k = x[:, per_group * d:(per_group + 1) * d].reshape(groups * d, *rest)
    v = x[:, (per_group + 1) * d:].reshape(groups * d, *rest)
    return q, k, v


def pad_rows(t: Tensor, rows: int, fill: float = 0.0, what: str = "") -> Tensor:
    """`t` with its first dimension padded to `rows` (new rows = fill)."""
    if t.shape[0] > rows:
        raise UserError(f"{what}: {t.shape[0]} vocabulary rows do not fit the model's "
                        f"padded vocabulary of {rows}")
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


# --- files ---------------------------------------------------------------------------------


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    """All tensors of a HF folder: model.safetensors or a sharded index. Safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(folder / shard))
        return out
    require_safetensors(folder)     # the one-line error for pickles or nothing
    raise UserError(f"{folder}: *.safetensors but neither model.safetensors nor "
                    "model.safetensors.index.json (not a Hugging Face model folder)")


def _family(cfg: ModelConfig):
    if cfg.family == "bert":
        from factory.train.convert import hf_bert

        return hf_bert
    from factory.train.convert import hf_llama

    return hf_llama


def load_hf_into_megatron(model: torch.nn.Module, hf_folder: Path, cfg: ModelConfig) -> None:
    """Copy a HF checkpoint's weights into `model` (built from `cfg`, any TP/PP, with or
    without interleaved model chunks), in place.

    Every model tensor must be covered except those the family may leave at their fresh
    initialisation (BERT's MLM head, when the checkpoint is a bare BertModel).
    """
    from factory.train.chunks import ModelChunks, chunks_of

    hf_folder = Path(hf_folder)
    fam = _family(cfg)
    full, fresh_ok = fam.hf_to_megatron(read_safetensors(hf_folder), cfg, source=hf_folder)
    interleaved = isinstance(model, ModelChunks)
    for i, chunk in enumerate(chunks_of(model)):
        converted = _pipeline_stage(full, cfg, vp_stage=i if interleaved else None)
        _copy_into(chunk, _tensor_parallel_shards(chunk, converted, cfg), fresh_ok, hf_folder)
    log.info("loaded %d tensors from %s", len(full), hf_folder)


def _copy_into(model: torch.nn.Module, converted: dict[str, Tensor], fresh_ok: tuple,
               hf_folder: Path) -> None:
    own = model.state_dict()
    problems = []
    with torch.no_grad():
        for key, value in converted.items():
            if key not in own:
                raise RuntimeError(f"conversion produced {key!r}, which the model lacks")
            if tuple(own[key].shape) != tuple(value.shape):
                problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model "
                                f"{tuple(own[key].shape)}")
                continue
            own[key].copy_(value)
    if problems:
        raise UserError(f"{hf_folder}: weights do not fit the model config: "
                        + "; ".join(problems[:3]))
    missing = [k for k, v in own.items() if k not in converted and isinstance(v, torch.Tensor)
               and not k.endswith("_extra_state") and not k.startswith(fresh_ok)]
    if missing:
        raise RuntimeError(f"conversion left model tensors unset: {missing[:5]}")


def _pipeline_stage(full: dict[str, Tensor], cfg: ModelConfig, vp_stage: int | None = None
                    ) -> dict[str, Tensor]:
    """This pipeline stage's (or model chunk's) tensors of a whole-model state dict, under its
    local names.

    megatron splits the layers evenly over the PP x V virtual stages; chunk i of pipeline rank
    r is virtual stage i * PP + r (V = 1, i = 0 without interleaving), and its layers are
    numbered from 0. The embedding lives on the first virtual stage, the final norm and output
    layer on the last. With tied embeddings the last stage holds its own copy of the word
    embedding as `output_layer.weight`.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return full
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    per_stage = cfg.num_layers // (pp * chunks)
    stage = (vp_stage or 0) * pp + parallel_state.get_pipeline_model_parallel_rank()
    first = stage * per_stage
    is_first = stage == 0
    is_last = stage == pp * chunks - 1
    out = {}
    for key, value in full.items():
        m = re.match(r"(decoder|encoder)\.layers\.(\d+)\.(.+)", key)
        if m:
            layer = int(m.group(2))
            if first <= layer < first + per_stage:
                out[f"{m.group(1)}.layers.{layer - first}.{m.group(3)}"] = value
        elif key.startswith("embedding."):
            if is_first:
                out[key] = value
            if is_last and not is_first and cfg.tie_embeddings and \
                    key == "embedding.word_embeddings.weight":
                out["output_layer.weight"] = value
        elif is_last:
            out[key] = value
    return out


def _tensor_parallel_shards(model: torch.nn.Module, full: dict[str, Tensor],
                            cfg: ModelConfig) -> dict[str, Tensor]:
    """This rank's slices of full (TP=1) tensors, the way megatron splits each parameter.

    A parameter marked `tensor_model_parallel` is cut into TP equal chunks along its
    `partition_dim` (column-parallel rows, row-parallel columns, vocabulary rows). The fused
    QKV needs nothing more: its rows go per query group, and groups split contiguously.
    SwiGLU's fc1 = [gate; up] is the exception: each rank holds [gate_r; up_r].
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    out = {}
    for key, value in full.items():
        p = params.get(key)
        if p is None or not getattr(p, "tensor_model_parallel", False):
            out[key] = value
            continue
        dim = p.partition_dim
        if cfg.family == "gpt" and key.endswith("mlp.linear_fc1.weight"):
            gate, up = value.chunk(2, dim=0)
            out[key] = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        else:
            out[key] = value.chunk(tp, dim=dim)[rank]
    return out


def save_hf(model: torch.nn.Module, cfg: ModelConfig, tokenizer_dir: Path | None,
            out_dir: Path) -> None:
    """Write `out_dir` as a plain HF folder: config.json (with architectures),
    model.safetensors, and the tokenizer files of `tokenizer_dir`."""
    from safetensors.torch import save_file

    _require_tp1("exporting to Hugging Face")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fam = _family(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    hf_state = fam.megatron_to_hf(state, cfg)
    # safetensors refuses shared storage and non-contiguous views.
    hf_state = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state.items()}
    save_file(hf_state, out_dir / "model.safetensors", metadata={"format": "pt"})
    ids = special_token_ids(tokenizer_dir) if tokenizer_dir is not None else {}
    fam.hf_config(cfg, ids).save_pretrained(out_dir)
    if tokenizer_dir is not None:
        copied = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
        if not copied:
            raise UserError(f"{tokenizer_dir}: no tokenizer files "
                            f"({', '.join(TOKENIZER_FILES[:3])}); rerun the vocab stage")
        for name in copied:
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    log.info("wrote %s (%d tensors)", out_dir, len(hf_state))


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """pad/bos/eos/cls/sep/mask ids of a tokenizer folder (those it defines)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({e})") from None
    ids = {}
    for name in ("pad", "bos", "eos", "cls", "sep", "mask", "unk"):
        value = getattr(tok, f"{name}_token_id", None)
        if isinstance(value, int):
            ids[name] = value
    return ids


def _require_tp1(what: str) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and \
            parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError(f"{what} needs tensor parallel 1: load the checkpoint at TP=1 "
                           "(dist_checkpointing reshards)")
