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
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

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

IGNORE = -100          # the label torch's cross-entropy skips: special and non-first sub-tokens


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IobSplit:
    """Sentences of one split: words and their IOB tags, aligned one to one."""

    tokens: list[list[str]]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int | None) -> IobSplit:
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
    def load(cls, folder: Path) -> NerData:
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


def _batch(items: list[Encoded], pad_id: int, device) -> dict:
    ids, mask = pad([e.input_ids for e in items], pad_id)
    labels, _ = pad([e.labels for e in items], IGNORE)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


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


class NerOptions(FinetuneOptions):
    """Fine-tuning settings of one NER task (the manifest's evaluation.tasks entry)."""

    max_train_sentences: int | None = Field(None, gt=0)
    max_test_sentences: int | None = Field(None, gt=0)


@dataclass
class TagResult:
    predictions: list[list[str]]     # one tag per word of each test sentence
    n_train: int
    n_test: int
    train_loss: float                # mean over the last epoch's worth of steps
    seconds: float
    truncated_words: int             # test words past max_seq_length, predicted O


@dataclass
class NerResult:
    f1: float
    precision: float
    recall: float
    n_train: int
    n_test: int
    predictions: list[list[str]]
    train_loss: float
    seconds: float
    truncated_words: int


def finetune_tagger(model_dir: Path, train: IobSplit, test: IobSplit, labels: list[str],
                    options: FinetuneOptions, progress: ProgressFn | None = None,
                    device: str | None = None) -> TagResult:
    """Fine-tune a token-classification head on `train` and tag the words of `test`.

    Any tag set works (IOB entities, UPOS, PICO); tags not in `labels` train as labels[0].
    The encoder comes from the Hugging Face folder `model_dir` (any architecture with an
    AutoModelForTokenClassification: BERT, Llama, ...); its own head is dropped.
    """
    import torch
    from transformers import AutoModelForTokenClassification

    start = time.perf_counter()
    dev = pick_device(device)
    label2id = {t: i for i, t in enumerate(labels)}
    tok = load_tokenizer(model_dir)
    train_enc = encode(tok, train, label2id, options.max_seq_length)
    test_enc = encode(tok, test, label2id, options.max_seq_length)

    seed_all(options.seed)   # the head's initialisation, dropout and batch order
    model = from_pretrained(
        AutoModelForTokenClassification, model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id=label2id, dtype=torch.float32)
    pad_id = set_pad_id(model, tok)
    model.to(dev)
    log.info("token-classification fine-tuning %s: %d train / %d test sentences, %d labels, "
             "on %s", model_dir, len(train_enc), len(test_enc), len(labels), dev)
    loss = fit(model, len(train_enc), lambda rows: _batch([train_enc[i] for i in rows],
                                                          pad_id, dev),
               options, what=f"token classification of {model_dir}", progress=progress)
    predictions, truncated = predict(model, test_enc, labels, pad_id, dev, progress)
    return TagResult(predictions, len(train_enc), len(test_enc), loss,
                     time.perf_counter() - start, truncated)


def finetune_ner(model_dir: Path, data: NerData, options: NerOptions,
                 progress: ProgressFn | None = None, device: str | None = None) -> NerResult:
    """Fine-tune a token-classification head on data.train, score entity F1 on data.test
    (each capped at options.max_train_sentences / max_test_sentences)."""
    train = data.train.head(options.max_train_sentences)
    test = data.test.head(options.max_test_sentences)
    r = finetune_tagger(model_dir, train, test, data.labels or label_list(train, test),
                        options, progress, device)
    scores = entity_scores(test.tags, r.predictions)
    log.info("NER %s: F1 %.2f (P %.2f, R %.2f) in %.0f s", model_dir, scores["f1"],
             scores["precision"], scores["recall"], r.seconds)
    return NerResult(scores["f1"], scores["precision"], scores["recall"], r.n_train,
                     r.n_test, r.predictions, r.train_loss, r.seconds, r.truncated_words)


def predict(model, encoded: list[Encoded], labels: list[str], pad_id: int, device,
            progress: ProgressFn | None = None) -> tuple[list[list[str]], int]:
    """Word-level tags from the first sub-token of each word; words cut off by truncation
    (or that tokenise to nothing) get labels[0]. Returns the tags and the number of such
    words."""
    logits = predict_logits(model, [len(e.input_ids) for e in encoded],
                            lambda rows: _batch([encoded[i] for i in rows], pad_id, device),
                            progress)
    out: list[list[str]] = []
    missing = 0
    for e, lg in zip(encoded, logits):
        best = lg.argmax(-1).tolist()
        tags = [labels[0]] * e.num_words
        seen = set()
        prev = None
        for pos, w in enumerate(e.word_ids):
            if w is not None and w != prev:
                tags[w] = labels[best[pos]]
                seen.add(w)
            prev = w
        missing += e.num_words - len(seen)
        out.append(tags)
    if missing:
        log.warning("%d test words were past max_seq_length (or had no sub-token): tagged %s",
                    missing, labels[0])
    return out, missing
