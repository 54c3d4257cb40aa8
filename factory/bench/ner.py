"""Named-entity recognition as a benchmark task: IOB data, fine-tuning, entity-level F1.

Any NER set in BLURB's IOB layout works (NCBI-disease, BC5CDR-chem/disease, JNLPBA, ...):
a folder with `train.tsv`, `test.tsv` (and optionally `devel.tsv`), one `token<TAB>tag` per
line, a blank line between sentences. The model sees the words pre-split
(`is_split_into_words`); only the first sub-token of a word carries a label, as in BERT's
CoNLL recipe (Devlin et al. 2019, section 5.3), and its prediction is the word's.

Later suites (BLURB, LexGLUE, ...) reuse `read_iob`, `NerData`, `finetune_ner` and
`entity_scores` as they are.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from factory.stage import UserError

log = logging.getLogger(__name__)

# (phase, done, total, values): the stage turns it into a progress bar and MLflow metrics.
ProgressFn = Callable[[str, int, int, dict[str, float]], None]

IGNORE = -100          # the label torch's cross-entropy skips: special and non-first sub-tokens
# Usual BERT fine-tuning settings (BLURB, PubMedBERT's fine-tuning): not user knobs yet.
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
CLIP_GRAD = 1.0
PREDICT_BATCH_SIZE = 64


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IobSplit:
    """Sentences of one split: words and their IOB tags, aligned one to one."""

    tokens: list[list[str]]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int | None) -> "IobSplit":
        """The first n sentences (all when n is None): caps keep the file's order."""
        if n is None or n >= len(self):
            return self
        return IobSplit(self.tokens[:n], self.tags[:n])


def read_iob(path: Path) -> IobSplit:
    """One `token<TAB>tag` per line, blank lines between sentences. UserError on bad lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (an IOB folder needs train.tsv and "
                        "test.tsv)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if words:
                tokens.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            raise UserError(f"{path}:{n}: expected `token<TAB>tag`, got {line[:60]!r}")
        tag = parts[-1].strip()
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise UserError(f"{path}:{n}: tag {tag!r} is not IOB (O, B-TYPE or I-TYPE)")
        words.append(parts[0])
        labels.append(tag)
    if words:
        tokens.append(words)
        tags.append(labels)
    if not tokens:
        raise UserError(f"{path}: no sentences (expected `token<TAB>tag` lines)")
    return IobSplit(tokens, tags)


@dataclass(frozen=True)
class NerData:
    """An IOB folder: train and test (devel when present) and the label set."""

    train: IobSplit
    test: IobSplit
    devel: IobSplit | None = None
    labels: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, folder: Path) -> "NerData":
        folder = Path(folder)
        train = read_iob(folder / "train.tsv")
        test = read_iob(folder / "test.tsv")
        devel = read_iob(folder / "devel.tsv") if (folder / "devel.tsv").is_file() else None
        return cls(train, test, devel, label_list(train, test))


def label_list(*splits: IobSplit) -> list[str]:
    """"O" first, then B-/I- of each type in sorted order: a stable id for each label."""
    types = sorted({t[2:] for s in splits for sent in s.tags for t in sent if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


# --- tokenisation -------------------------------------------------------------------------


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Label of each sub-token: the word's label on its first sub-token, IGNORE elsewhere."""
    out = []
    prev = None
    for w in word_ids:
        out.append(IGNORE if w is None or w == prev else word_labels[w])
        prev = w
    return out


def load_tokenizer(model_dir: Path):
    """The model's fast tokenizer (word_ids, which maps sub-tokens to words, needs one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.is_fast:
        raise UserError(f"{model_dir}: the tokenizer has no tokenizer.json (a fast tokenizer "
                        "is needed to map sub-tokens back to words)")
    return tok


def pre_split(tokenizer, sentences: list[list[str]]) -> list[list[str]]:
    """The words as the tokenizer must receive them to tokenise as in running text.

    WordPiece ignores spaces, but a byte-level BPE (GPT-2 style) pre-tokenizer marks a word
    that follows a space ("Ġcancer"); words handed over one by one lose that mark and come
    out as pieces the model never saw in pretraining. Such tokenizers get the space back.
    """
    want = tokenizer("x cancer", add_special_tokens=False)["input_ids"]

    def split(words):
        return tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]

    if split(["x", "cancer"]) != want and split(["x", " cancer"]) == want:
        return [[w if i == 0 else " " + w for i, w in enumerate(s)] for s in sentences]
    return sentences


@dataclass(frozen=True)
class Encoded:
    """One sentence as the model sees it; word_ids maps sub-tokens back to words."""

    input_ids: list[int]
    labels: list[int]
    word_ids: list[int | None]
    num_words: int


def encode(tokenizer, split: IobSplit, label2id: dict[str, int],
           max_seq_length: int) -> list[Encoded]:
    """Sub-tokenise the sentences, truncated to max_seq_length; tags unknown to label2id -> O."""
    enc = tokenizer(pre_split(tokenizer, split.tokens), is_split_into_words=True,
                    truncation=True, max_length=max_seq_length)
    out = []
    for i, (words, tags) in enumerate(zip(split.tokens, split.tags)):
        wids = enc.word_ids(i)
        ids = [label2id.get(t, 0) for t in tags]
        out.append(Encoded(enc["input_ids"][i], align_labels(wids, ids), wids, len(words)))
    return out


def _batch(items: list[Encoded], pad_id: int, device):
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


# --- metric -------------------------------------------------------------------------------


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 in percent (seqeval, conlleval rules).

    An entity counts only when its type and both boundaries match; an I- tag that follows O
    starts an entity (as conlleval does); entities never run across sentences.
    """
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tags differ in shape")
    p, r, f, _ = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    return {"f1": 100.0 * float(f), "precision": 100.0 * float(p), "recall": 100.0 * float(r)}


# --- fine-tuning --------------------------------------------------------------------------


class NerOptions(BaseModel):
    """Fine-tuning settings of one NER task (the manifest's evaluation.tasks entry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, gt=0)
    max_seq_length: int = Field(128, gt=8)
    max_train_sentences: int | None = Field(None, gt=0)
    max_test_sentences: int | None = Field(None, gt=0)
    seed: int = 42


@dataclass
class NerResult:
    f1: float
    precision: float
    recall: float
    n_train: int
    n_test: int
    predictions: list[list[str]]
    train_loss: float               # mean over the last epoch's worth of steps
    seconds: float
    truncated_words: int            # test words past max_seq_length, predicted O


def training_steps(n_train: int, options: NerOptions) -> int:
    per_epoch = math.ceil(n_train / options.batch_size)
    return max(1, math.ceil(options.epochs * per_epoch))


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune_ner(model_dir: Path, data: NerData, options: NerOptions,
                 progress: ProgressFn | None = None, device: str | None = None) -> NerResult:
    """Fine-tune a token-classification head on data.train, score entity F1 on data.test.

    The encoder comes from the Hugging Face folder `model_dir` (any architecture with an
    AutoModelForTokenClassification: BERT, Llama, ...); its own head is dropped.
    """
    import torch
    from transformers import AutoModelForTokenClassification, get_linear_schedule_with_warmup

    start = time.perf_counter()
    dev = _device(device)
    train = data.train.head(options.max_train_sentences)
    test = data.test.head(options.max_test_sentences)
    labels = data.labels or label_list(train, test)
    label2id = {t: i for i, t in enumerate(labels)}

    tok = load_tokenizer(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_enc = encode(tok, train, label2id, options.max_seq_length)
    test_enc = encode(tok, test, label2id, options.max_seq_length)

    _seed_all(options.seed)   # the head's initialisation, dropout and batch order
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id=label2id, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    model.to(dev)

    no_decay = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)],
         "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=options.lr)
    total = training_steps(len(train_enc), options)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(WARMUP_FRACTION * total), total)
    log.info("NER fine-tuning %s: %d train / %d test sentences, %d labels, %d steps on %s",
             model_dir, len(train_enc), len(test_enc), len(labels), total, dev)

    gen = torch.Generator().manual_seed(options.seed)
    per_epoch = math.ceil(len(train_enc) / options.batch_size)
    recent: list[float] = []
    step = 0
    model.train()
    while step < total:
        order = torch.randperm(len(train_enc), generator=gen).tolist()
        for b in range(per_epoch):
            if step >= total:
                break
            bs = options.batch_size
            rows = [train_enc[i] for i in order[b * bs:(b + 1) * bs]]
            ids, mask, lab = _batch(rows, pad_id, dev)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UserError(f"NER fine-tuning of {model_dir} diverged at step {step} "
                                f"(loss {value}): lower the task's lr ({options.lr})")
            recent = (recent + [value])[-per_epoch:]
            if progress is not None:
                progress("train", step, total, {"loss": value, "lr": scheduler.get_last_lr()[0]})

    predictions, truncated = predict(model, test_enc, labels, pad_id, dev, progress)
    scores = entity_scores(test.tags, predictions)
    seconds = time.perf_counter() - start
    log.info("NER %s: F1 %.2f (P %.2f, R %.2f) in %.0f s", model_dir, scores["f1"],
             scores["precision"], scores["recall"], seconds)
    return NerResult(scores["f1"], scores["precision"], scores["recall"], len(train_enc),
                     len(test_enc), predictions, sum(recent) / max(1, len(recent)), seconds,
                     truncated)


def predict(model, encoded: list[Encoded], labels: list[str], pad_id: int, device,
            progress: ProgressFn | None = None) -> tuple[list[list[str]], int]:
    """Word-level tags from the first sub-token of each word; words cut off by truncation
    (or that tokenise to nothing) get O. Returns the tags and the number of such words."""
    import torch

    model.eval()
    out: list[list[str] | None] = [None] * len(encoded)
    # Length-sorted batches waste little on padding; order is restored through `out`.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    missing = 0
    batches = [order[i:i + PREDICT_BATCH_SIZE] for i in range(0, len(order), PREDICT_BATCH_SIZE)]
    with torch.inference_mode():
        for done, rows in enumerate(batches, 1):
            ids, mask, _ = _batch([encoded[i] for i in rows], pad_id, device)
            best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu().tolist()
            for r, i in enumerate(rows):
                e = encoded[i]
                tags = ["O"] * e.num_words
                seen = set()
                prev = None
                for pos, w in enumerate(e.word_ids):
                    if w is not None and w != prev:
                        tags[w] = labels[best[r][pos]]
                        seen.add(w)
                    prev = w
                missing += e.num_words - len(seen)
                out[i] = tags
            if progress is not None:
                progress("predict", done, len(batches), {})
    if missing:
        log.warning("%d test words were past max_seq_length (or had no sub-token): tagged O",
                    missing)
    return [t for t in out if t is not None], missing
