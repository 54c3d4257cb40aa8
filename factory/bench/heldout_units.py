"""Held-out measures that compare models with different vocabularies.

Loss per token is no common currency: a vocabulary that splits words into more pieces gets
easier pieces. So the unit is the text, not the token:

- bert: whole-word-masked loss per word. The masked words are drawn from the whitespace words
  of each document with a seeded generator that never sees the tokenizer, so every model is
  asked about the same words; all pieces of a masked word are masked together and the word's
  loss is the sum of its pieces' cross-entropies. Nats per masked word.
- gpt: bits per byte. Next-token cross-entropy summed over every token of the document (the
  first one predicted from the BOS/EOS token), in bits, over the document's UTF-8 bytes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np

from factory.bench.heldout import logits_at
from factory.hf_weights import from_pretrained
from factory.stage import UserError

WORD = re.compile(r"\S+")
SEED = 1234


def heldout_per_unit(model_dir: Path, texts: list[str], family: Literal["bert", "gpt"],
                     seq_length: int, *, mask_prob: float = 0.15, seed: int = SEED,
                     batch_size: int = 16, device: str | None = None) -> dict[str, float | str]:
    """{"loss", "unit", "units"}: nats per masked word (bert) or bits per byte (gpt)."""
    import torch
    from transformers import AutoTokenizer

    if not texts:
        raise UserError("no held-out text to score")
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if family == "bert":
        return _per_word(model_dir, tok, texts, seq_length, mask_prob, seed, batch_size, dev)
    return _per_byte(model_dir, tok, texts, seq_length, batch_size, dev)


def _word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


def _token_words(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The whitespace word each token belongs to (-1 for tokens of no word)."""
    out, w = [], 0
    for start, end in offsets:
        while w < len(spans) and spans[w][1] <= start:
            w += 1
        out.append(w if w < len(spans) and end > start and spans[w][0] <= start else -1)
    return out


def _windows(word_of: list[int], room: int) -> list[tuple[int, int]]:
    """Token ranges of whole words, at most `room` tokens each."""
    out, start = [], 0
    while start < len(word_of):
        end = min(start + room, len(word_of))
        # Back off to a word boundary unless a single word fills the window.
        while end < len(word_of) and end > start and word_of[end] == word_of[end - 1] != -1:
            end -= 1
        if end == start:
            end = min(start + room, len(word_of))
        out.append((start, end))
        start = end
    return out


def _per_word(model_dir, tok, texts, seq_length, mask_prob, seed, batch_size, dev):
    import torch
    from transformers import AutoModelForMaskedLM

    if tok.mask_token_id is None:
        raise UserError(f"{model_dir}: the tokenizer has no mask token; a masked LM is needed")
    model = from_pretrained(AutoModelForMaskedLM, model_dir, dtype=torch.float32).to(dev).eval()
    vocab = len(tok)
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for d, text in enumerate(texts):
        spans = _word_spans(text)
        chosen = np.random.default_rng([seed, d]).random(len(spans)) < mask_prob
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        word_of = _token_words(enc["offset_mapping"], spans)
        for a, b in _windows(word_of, seq_length - 2):
            ids = list(enc["input_ids"][a:b])
            words = word_of[a:b]
            masked = [i for i, w in enumerate(words) if w >= 0 and chosen[w]]
            if not masked:
                continue
            targets = [ids[i] for i in masked]
            for i in masked:
                ids[i] = tok.mask_token_id
            seq = [tok.cls_token_id, *ids, tok.sep_token_id]
            rows.append((seq, [i + 1 for i in masked], targets,
                         [d * 1_000_000 + words[i] for i in masked]))
    word_nll: dict[int, float] = {}
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            width = max(len(r[0]) for r in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id or 0, dtype=torch.long)
            att = torch.zeros_like(ids)
            for r, (seq, *_rest) in enumerate(batch):
                ids[r, :len(seq)] = torch.tensor(seq)
                att[r, :len(seq)] = 1
            rws = [r for r, row in enumerate(batch) for _ in row[1]]
            cols = [p for row in batch for p in row[1]]
            picked = logits_at(model, "bert", ids.to(dev), att.to(dev), torch.tensor(rws),
                               torch.tensor(cols))[:, :vocab].double()
            targets = torch.tensor([t for row in batch for t in row[2]], device=picked.device)
            nll = torch.nn.functional.cross_entropy(picked, targets, reduction="none")
            for w, v in zip((w for row in batch for w in row[3]), nll.tolist()):
                word_nll[w] = word_nll.get(w, 0.0) + v
    if not word_nll:
        raise UserError("held-out text gives no word to score")
    return {"loss": sum(word_nll.values()) / len(word_nll), "unit": "nats/word (whole-word masked)",
            "units": float(len(word_nll))}


def _per_byte(model_dir, tok, texts, seq_length, batch_size, dev):
    import torch
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, model_dir, dtype=torch.float32).to(dev).eval()
    # The token a document starts after: the tokenizer's BOS/EOS, else the model config's.
    candidates = (tok.bos_token_id, tok.eos_token_id, model.config.bos_token_id,
                  model.config.eos_token_id)
    start = next((c for c in candidates if isinstance(c, int)), None)
    if start is None:
        raise UserError(f"{model_dir}: neither tokenizer nor config names a BOS or EOS token")
    chunks: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        chunks += [[start, *ids[i:i + seq_length - 1]] for i in range(0, len(ids), seq_length - 1)]
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(chunks), batch_size):
            batch = chunks[s:s + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), start, dtype=torch.long)
            att = torch.zeros_like(ids)
            for r, c in enumerate(batch):
                ids[r, :len(c)] = torch.tensor(c)
                att[r, :len(c)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits[..., :len(tok)].double().transpose(1, 2), ids[:, 1:].to(dev),
                reduction="none")
            total += float((nll * att[:, 1:].to(dev)).sum())
    return {"loss": total / math.log(2) / max(n_bytes, 1), "unit": "bits/byte",
            "units": float(n_bytes)}
