"""Sequence-level heads: single-label and multi-label classification, regression, and
multiple choice, fine-tuned with transformers' Auto* heads on any Hugging Face folder.

Sentence pairs (BIOSSES, PubMedQA, CoSQA) go in as the tokenizer's pair input
(`[CLS] a [SEP] b [SEP]` for BERT), truncated longest-first. Multiple choice pairs the context
with each ending (CaseHOLD, as LexGLUE's run script does) and scores the five jointly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from factory.bench.finetune import (
    FinetuneOptions,
    ProgressFn,
    fit,
    pad,
    pick_device,
    predict_logits,
    seed_all,
    set_pad_id,
)
from factory.hf_weights import from_pretrained
from factory.stage import UserError

log = logging.getLogger(__name__)

Problem = Literal["single", "multi", "regression"]


@dataclass(frozen=True)
class TextExample:
    """One input text (or pair) and its label: a class id (single), a tuple of class ids
    (multi), or a score (regression). group: the document a sentence belongs to (HoC)."""

    text: str
    label: int | float | tuple[int, ...]
    pair: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class ChoiceExample:
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass
class Predictions:
    values: list            # class id, tuple of ids, score, or chosen ending per test example
    n_train: int
    n_test: int
    train_loss: float
    seconds: float


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _encode(tok, firsts: list[str], seconds: list[str] | None, max_len: int) -> list[dict]:
    enc = tok(firsts, seconds, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(firsts))]


def _collate(rows: list[dict], pad_id: int, device) -> dict:
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)[0].to(device)
    return out


def finetune_classifier(model_dir: Path, train: list[TextExample], test: list[TextExample],
                        problem: Problem, num_labels: int, options: FinetuneOptions,
                        progress: ProgressFn | None = None,
                        device: str | None = None) -> Predictions:
    """Fine-tune AutoModelForSequenceClassification on `train`, predict `test`.

    multi: one sigmoid per label, predicted when p > 0.5; regression: one output, MSE.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    start = time.perf_counter()
    dev = pick_device(device)
    tok = _tokenizer(model_dir)
    has_pairs = any(e.pair is not None for e in train + test)

    def encode(examples):
        return _encode(tok, [e.text for e in examples],
                       [e.pair or "" for e in examples] if has_pairs else None,
                       options.max_seq_length)

    train_enc, test_enc = encode(train), encode(test)
    seed_all(options.seed)
    kind = {"single": "single_label_classification", "multi": "multi_label_classification",
            "regression": "regression"}[problem]
    model = from_pretrained(
        AutoModelForSequenceClassification, model_dir, num_labels=1 if problem == "regression" else num_labels, problem_type=kind,
        dtype=torch.float32)
    pad_id = set_pad_id(model, tok)
    model.to(dev)

    def label_tensor(rows):
        if problem == "single":
            return torch.tensor([train[i].label for i in rows], dtype=torch.long)
        if problem == "regression":
            return torch.tensor([float(train[i].label) for i in rows], dtype=torch.float32)
        y = torch.zeros((len(rows), num_labels), dtype=torch.float32)
        for r, i in enumerate(rows):
            y[r, list(train[i].label)] = 1.0
        return y

    def train_batch(rows):
        return {**_collate([train_enc[i] for i in rows], pad_id, dev),
                "labels": label_tensor(rows).to(dev)}

    log.info("%s fine-tuning %s: %d train / %d test examples on %s", problem, model_dir,
             len(train), len(test), dev)
    loss = fit(model, len(train), train_batch, options,
               what=f"sequence classification of {model_dir}", progress=progress)
    logits = predict_logits(model, [len(e["input_ids"]) for e in test_enc],
                            lambda rows: _collate([test_enc[i] for i in rows], pad_id, dev),
                            progress)
    if problem == "single":
        values = [int(lg.argmax()) for lg in logits]
    elif problem == "regression":
        values = [float(lg.reshape(-1)[0]) for lg in logits]
    else:
        values = [tuple(int(k) for k in torch.nonzero(lg > 0).reshape(-1)) for lg in logits]
    return Predictions(values, len(train), len(test), loss, time.perf_counter() - start)


def finetune_choice(model_dir: Path, train: list[ChoiceExample], test: list[ChoiceExample],
                    options: FinetuneOptions, progress: ProgressFn | None = None,
                    device: str | None = None) -> Predictions:
    """Fine-tune AutoModelForMultipleChoice (BERT-like encoders) and pick an ending per test
    example."""
    import torch
    from transformers import AutoModelForMultipleChoice

    start = time.perf_counter()
    dev = pick_device(device)
    tok = _tokenizer(model_dir)
    widths = {len(e.endings) for e in train + test}
    if len(widths) != 1:
        raise UserError(f"multiple choice needs the same number of endings everywhere, got "
                        f"{sorted(widths)}")
    n_choices = widths.pop()

    def encode(examples):
        firsts = [e.context for e in examples for _ in e.endings]
        seconds = [c for e in examples for c in e.endings]
        flat = _encode(tok, firsts, seconds, options.max_seq_length)
        return [flat[i * n_choices:(i + 1) * n_choices] for i in range(len(examples))]

    train_enc, test_enc = encode(train), encode(test)
    seed_all(options.seed)
    try:
        model = from_pretrained(AutoModelForMultipleChoice, model_dir, dtype=torch.float32)
    except ValueError as e:
        raise UserError(f"{model_dir}: no multiple-choice head for this architecture "
                        f"({e.__class__.__name__}); use an encoder (BERT-like) model") from None
    pad_id = set_pad_id(model, tok)
    model.to(dev)

    def batch(enc, rows, labels: bool):
        flat = _collate([c for i in rows for c in enc[i]], pad_id, dev)
        out = {k: v.view(len(rows), n_choices, -1) for k, v in flat.items()}
        if labels:
            out["labels"] = torch.tensor([train[i].label for i in rows], device=dev)
        return out

    loss = fit(model, len(train), lambda rows: batch(train_enc, rows, True), options,
               what=f"multiple choice of {model_dir}", progress=progress)
    logits = predict_logits(model, [max(len(c["input_ids"]) for c in e) for e in test_enc],
                            lambda rows: batch(test_enc, rows, False), progress)
    values = [int(lg.argmax()) for lg in logits]
    return Predictions(values, len(train), len(test), loss, time.perf_counter() - start)
