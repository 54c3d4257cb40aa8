"""Embedding rows for added vocabulary entries, before continued pretraining.

A new entry starts as the mean of the base embeddings of the pieces the base tokenizer cuts
its string into (Hewitt 2021, "Initializing new word embeddings for pretrained language
models"; the usual recipe of vocabulary-extension papers such as exBERT and AdaLM): the model
then reads "acetyltransferase" roughly as it read "ace ##ty ##lt ##ran ##sf ##eras ##e",
instead of as noise. Rows of the base vocabulary are never touched.

`init_added_rows` works on one tensor (the engine calls it on megatron weights);
`extend_hf_model` rewrites a Hugging Face folder (input embedding, untied output embedding,
MLM decoder bias) at the padded size that Megatron uses.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch

from factory.stage import UserError
from tokenization.fertility import as_tokenizer

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 128
# Tensor names (suffixes) of a HF checkpoint that are indexed by token id.
INPUT_EMBEDDING = ("word_embeddings.weight", "embed_tokens.weight", "wte.weight")
OUTPUT_EMBEDDING = ("lm_head.weight", "predictions.decoder.weight")
OUTPUT_BIAS = ("predictions.bias", "predictions.decoder.bias", "lm_head.bias")


def base_piece_ids(base_tokenizer, new_tokenizer, first_new_id: int) -> dict[int, list[int]]:
    """For every new id (>= first_new_id) of `new_tokenizer`, the base ids of its pieces.

    Same model type: the base model segments the stored string itself ("Ġacetyl" is cut by
    the byte-level merges, "##ase" as a continuation). Otherwise the decoded text is encoded.
    An entry the base cannot represent (unknown pieces only) maps to [].
    """
    base, new = as_tokenizer(base_tokenizer), as_tokenizer(new_tokenizer)
    bdata, ndata = json.loads(base.to_str())["model"], json.loads(new.to_str())["model"]
    same = bdata["type"] == ndata["type"]
    prefix = bdata.get("continuing_subword_prefix") or "##"
    unk = base.token_to_id(bdata.get("unk_token") or "") if bdata.get("unk_token") else None
    bvocab = base.get_vocab(with_added_tokens=True)
    out: dict[int, list[int]] = {}
    for i in range(first_new_id, new.get_vocab_size(with_added_tokens=True)):
        token = new.id_to_token(i)
        if token is None:
            continue
        if same and bdata["type"] == "WordPiece" and token.startswith(prefix):
            ids = _continuation(token[len(prefix):], bvocab, prefix)
        elif same:
            ids = [t.id for t in base.model.tokenize(token)]
        else:
            ids = base.encode(new.decode([i]).strip(), add_special_tokens=False).ids
        out[i] = [j for j in ids if j != unk and j < first_new_id]
    return out


def _continuation(rest: str, vocab: dict[str, int], prefix: str) -> list[int]:
    """WordPiece's longest-match-first on a word's continuation (every piece `##`)."""
    ids = []
    while rest:
        for end in range(len(rest), 0, -1):
            if prefix + rest[:end] in vocab:
                ids.append(vocab[prefix + rest[:end]])
                rest = rest[end:]
                break
        else:
            return []
    return ids


def init_added_rows(weight: torch.Tensor, base_tokenizer, new_tokenizer,
                    first_new_id: int) -> None:
    """In place: row i (first_new_id <= i < new vocabulary size) = mean of the base rows of
    its base pieces. Rows below first_new_id and padded rows past the new vocabulary are left
    untouched; an entry without base pieces gets the mean of all base rows. `weight` is
    [rows, hidden] (an embedding) or [rows] (an output bias)."""
    pieces = base_piece_ids(base_tokenizer, new_tokenizer, first_new_id)
    if pieces and max(pieces) >= weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} rows; the new vocabulary needs "
                         f"{max(pieces) + 1}")
    with torch.no_grad():
        fallback = weight[:first_new_id].float().mean(dim=0)
        for i, ids in pieces.items():
            row = weight[ids].float().mean(dim=0) if ids else fallback
            weight[i] = row.to(weight.dtype)


def padded_size(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def extend_hf_model(base_folder: str | Path, new_tokenizer_folder: str | Path,
                    out_folder: str | Path, pad_multiple: int = PAD_MULTIPLE) -> Path:
    """Write `out_folder`: the base HF model with its token-indexed tensors resized to the new
    vocabulary padded to `pad_multiple` rows, the new rows initialised by `init_added_rows`.

    Base rows stay bit-identical (a base's own padding rows too, unless new entries take them).
    Added padding rows: zero embeddings and the MLM bias the factory's import gives padding
    (PADDED_VOCAB_BIAS), so they take no probability.
    config.json says vocab_size = the padded size; the tokenizer files are the new folder's.
    """
    from safetensors.torch import save_file

    from factory.train.convert import TOKENIZER_FILES, read_safetensors
    from factory.train.models import PADDED_VOCAB_BIAS

    base, new_dir, out = Path(base_folder), Path(new_tokenizer_folder), Path(out_folder)
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{base}: no config.json (not a Hugging Face model folder)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    old_rows = int(config["vocab_size"])
    base_tok = as_tokenizer(base)
    new_tok = as_tokenizer(new_dir)
    first_new = base_tok.get_vocab_size(with_added_tokens=True)
    new_size = new_tok.get_vocab_size(with_added_tokens=True)
    if new_size < first_new:
        raise UserError(f"{new_dir}: {new_size} entries, fewer than the base's {first_new}")
    for t, i in base_tok.get_vocab(with_added_tokens=True).items():
        if new_tok.token_to_id(t) != i:
            raise UserError(f"{new_dir}: not an extension of {base}'s tokenizer ({t!r} has id "
                            f"{new_tok.token_to_id(t)}, base id {i})")
    rows = max(padded_size(new_size, pad_multiple), old_rows)

    state = read_safetensors(base)
    resized = []
    for key, t in state.items():
        kind = _token_indexed(key)
        if kind is None or t.shape[0] != old_rows:
            continue
        grown = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
        grown[:old_rows] = t
        if kind == "bias":
            grown[old_rows:] = PADDED_VOCAB_BIAS
        init_added_rows(grown, base_tok, new_tok, first_new)
        state[key] = grown
        resized.append(key)
    if not any(_token_indexed(k) == "input" for k in resized):
        raise UserError(f"{base}: no input embedding of {old_rows} rows found (looked for "
                        f"*{', *'.join(INPUT_EMBEDDING)})")

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES and not f.name.startswith("model") \
                and f.name != "config.json" and not f.name.endswith((".bin", ".pt", ".pth")):
            shutil.copy2(f, out / f.name)
    for name in TOKENIZER_FILES:
        if (new_dir / name).is_file():
            shutil.copy2(new_dir / name, out / name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config["vocab_size"] = rows
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("extended %s: %s from %d to %d rows (%d new tokens, %d padding)", base,
                ", ".join(resized), old_rows, rows, new_size - first_new, rows - new_size)
    return out


def _token_indexed(key: str) -> str | None:
    if key.endswith(INPUT_EMBEDDING):
        return "input"
    if key.endswith(OUTPUT_EMBEDDING):
        return "output"
    if key.endswith(OUTPUT_BIAS):
        return "bias"
    return None
