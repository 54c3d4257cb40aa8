"""Intrinsic evaluation: the exported model's loss on held-out text, next to a unigram floor.

bert: a fixed, seeded 15% of the non-special tokens of each sequence are replaced by the
mask token and the loss is the cross-entropy of the original ids there (no 80/10/10: the
number should move only with the model). gpt: next-token cross-entropy. Both in nats per
predicted token. The unigram baseline predicts the very same positions with add-one smoothed
token frequencies of the training data; a model that does not beat it has learnt no context.

The exported MLM head may be padded past the tokenizer (vocab a multiple of 128): those
logits name no token and are dropped before the softmax.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from factory.stage import UserError

log = logging.getLogger(__name__)

# (phase, done, total, values), as factory.bench.ner.ProgressFn.
ProgressFn = Callable[[str, int, int, dict[str, float]], None]

MASK_SEED = 1234


def read_documents(files: Iterable[Path], max_docs: int | None = None,
                   text_field: str = "text") -> list[str]:
    """Texts of the JSON Lines files (plain or .gz), in file order, up to max_docs."""
    texts: list[str] = []
    for path in files:
        opener = gzip.open if str(path).endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if max_docs is not None and len(texts) >= max_docs:
                        return texts
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get(text_field)
                    except (json.JSONDecodeError, AttributeError):
                        raise UserError(f"{path}:{n}: not a JSON object per line") from None
                    if isinstance(text, str) and text.strip():
                        texts.append(text)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    return texts


def unigram_logprobs(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) for ids < vocab_size, add-one smoothed: (count + 1) / (total + V)."""
    c = np.zeros(vocab_size, dtype=np.float64)
    n = min(vocab_size, len(counts))
    c[:n] = np.asarray(counts[:n], dtype=np.float64)
    return np.log(c + 1.0) - math.log(c.sum() + vocab_size)


def make_sequences(tokenizer, texts: list[str], family: Literal["bert", "gpt"],
                   seq_length: int, eod_id: int | None = None, mask_prob: float = 0.15,
                   seed: int = MASK_SEED) -> list[tuple[list[int], list[int], list[int]]]:
    """(input_ids, positions, targets) per sequence: the model reads input_ids and is scored
    on predicting targets at positions (for gpt the logits at p - 1 predict position p)."""
    if not texts:
        return []
    out = []
    if family == "bert":
        if tokenizer.mask_token_id is None:
            raise UserError("the exported tokenizer has no mask token: cannot score a masked LM")
        # Overflowing windows of one document each come wrapped in [CLS] ... [SEP].
        enc = tokenizer(texts, truncation=True, max_length=seq_length,
                        return_overflowing_tokens=True, return_special_tokens_mask=True,
                        verbose=False)
        rng = np.random.default_rng(seed)
        for seq, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
            cand = [i for i, sp in enumerate(special) if not sp]
            if not cand:
                continue
            k = max(1, round(mask_prob * len(cand)))
            pos = sorted(int(p) for p in rng.choice(cand, size=k, replace=False))
            targets = [seq[p] for p in pos]
            masked = list(seq)
            for p in pos:
                masked[p] = tokenizer.mask_token_id
            out.append((masked, pos, targets))
    else:
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            ids = list(ids) + ([eod_id] if eod_id is not None else [])
            for s in range(0, len(ids), seq_length):
                seq = ids[s:s + seq_length]
                if len(seq) > 1:
                    out.append((seq, list(range(1, len(seq))), seq[1:]))
    return out


def heldout_loss(model_dir: Path, texts: list[str], family: Literal["bert", "gpt"],
                 seq_length: int, unigram_counts: np.ndarray, *, eod_id: int | None = None,
                 mask_prob: float = 0.15, seed: int = MASK_SEED, batch_size: int = 16,
                 device: str | None = None,
                 progress: ProgressFn | None = None) -> dict[str, float]:
    """Mean cross-entropy (nats) of the model and of the unigram baseline on held-out text.

    Returns {"heldout_loss", "heldout_unigram_loss", "heldout_tokens"}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    seqs = make_sequences(tok, texts, family, seq_length, eod_id, mask_prob, seed)
    if not seqs:
        raise UserError(f"held-out text gives no sequence to score ({len(texts)} documents)")
    uni = unigram_logprobs(unigram_counts, vocab)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    model_nll = 0.0
    uni_nll = 0.0
    count = 0
    batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    with torch.inference_mode():
        for done, batch in enumerate(batches, 1):
            width = max(len(s[0]) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, targets = [], [], []
            shift = 0 if family == "bert" else 1
            for r, (seq, pos, tgt) in enumerate(batch):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                rows += [r] * len(pos)
                cols += [p - shift for p in pos]
                targets += tgt
            picked = logits_at(model, family, ids.to(dev), mask.to(dev), torch.tensor(rows),
                                torch.tensor(cols))[:, :vocab].float()
            tgt = torch.tensor(targets, device=picked.device)
            nll = torch.nn.functional.cross_entropy(picked, tgt, reduction="none")
            model_nll += float(nll.double().sum())
            uni_nll += float(-uni[np.asarray(targets)].sum())
            count += len(targets)
            if progress is not None:
                progress("heldout", done, len(batches), {"loss": model_nll / count})

    result = {"heldout_loss": model_nll / count, "heldout_unigram_loss": uni_nll / count,
              "heldout_tokens": float(count)}
    log.info("held-out loss %.4f nats (unigram %.4f) over %d tokens of %d documents",
             result["heldout_loss"], result["heldout_unigram_loss"], count, len(texts))
    if result["heldout_loss"] >= result["heldout_unigram_loss"]:
        log.warning("the model does not beat the unigram baseline on held-out text "
                    "(%.4f >= %.4f nats): it has learnt no use of context",
                    result["heldout_loss"], result["heldout_unigram_loss"])
    return result


def logits_at(model, family: str, ids, mask, rows, cols):
    """Logits at (rows, cols) only: the MLM head over every position would cost more than
    the whole encoder (vocab x hidden per position) for the 15% that are scored."""
    head = getattr(model, "cls", None) if family == "bert" else getattr(model, "lm_head", None)
    if head is None:
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols]
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return head(hidden[rows, cols])
