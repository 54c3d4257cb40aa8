"""The pack stage: tokenize the corpus into megatron-core indexed datasets (.bin/.idx).

Reads corpus/train/<source>/*.jsonl.gz, corpus/heldout/*.jsonl.gz and vocab/tokenizer/;
writes <source>_train.bin/.idx per source, heldout.bin/.idx, general_heldout.bin/.idx (the
general-language held-out text, corpus.general_text, by default the shipped English sample in
domains/general/: what training.eval_interval measures forgetting on), unigram_counts.npy
(int64 count per token id over the training .bin files) and pack.json (the pack/ contract).

bert: a document is stored as its list of sentences, one sequence each (Megatron-LM's
preprocess_data.py --split-sentences), no special tokens: the BERT dataset adds [CLS]/[SEP].
gpt: a document is one sequence with the tokenizer's end-of-document id appended.
Tokenization is batched through the Rust tokenizer (encode_batch, parallel inside).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from factory.corpus.blend import BlendSource
from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError
from factory.vocab import general_text, general_text_problems
from tokenization.io import batched

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

BATCH_DOCS = 512
HELDOUT_PREFIX = "heldout"
GENERAL_PREFIX = "general_heldout"

# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by whitespace and
# a capital letter or digit (optionally after an opening quote/bracket); a line break always
# ends one (a title, a labelled abstract section). Simple on purpose: abbreviations such as
# "e.g. The" over-split, which costs BERT's next-sentence structure nothing it uses here.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` by the rule above; empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


# A packed source with its blend settings (recorded in pack.json).
PackSource = BlendSource


class PackConfig(StageConfig):
    family: Literal["bert", "gpt"]
    sources: list[PackSource]
    workers: int | None = Field(None, gt=0, description="Tokenizing processes (default: "
                                "the CPU count); the output does not depend on it")
    general_text: str | None = Field(None, description="General-language held-out JSON Lines, "
                                     "packed as general_heldout (corpus.general_text)")


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while every id fits (what megatron's GPTDataset assumes for vocab <= 65536)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def encode_docs(tok, texts: list[str], family: str, eod: int, dtype
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of a batch of documents: (all ids, flat; each sequence's length; each
    document's sequence count, 0 for a document without tokens). gpt: a sequence per
    document, end-of-document id appended; bert: a sequence per sentence."""
    if family == "gpt":
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        seqs = [i + [eod] for i in ids if i]
        nseq = [1 if i else 0 for i in ids]
    else:
        per_doc = [split_sentences(t) for t in texts]
        flat = [x for sents in per_doc for x in sents]
        encs = iter(tok.encode_batch(flat, add_special_tokens=False) if flat else [])
        seqs, nseq = [], []
        for sents in per_doc:
            pieces = [p for p in (next(encs).ids for _ in sents) if p]
            seqs += pieces
            nseq.append(len(pieces))
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    all_ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lens.sum()))
    return all_ids, lens, np.asarray(nseq, dtype=np.int64)


_WORKER: dict = {}


def _worker_init(tok_dir: str, family: str, eod: int, dtype) -> None:
    # one Rust thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # tokenization.train, not tokenization.megatron: a worker needs no megatron import
    from tokenization.train import load_backend

    tok = load_backend(tok_dir)[0]
    tok.no_truncation()     # as MegatronTokenizer.backend: every token, no padding
    tok.no_padding()
    _WORKER.update(tok=tok, family=family, eod=eod, dtype=dtype)


def _worker_encode(texts: list[str]):
    w = _WORKER
    return encode_docs(w["tok"], texts, w["family"], w["eod"], w["dtype"])


def _ordered(pool, texts: Iterable[str], depth: int) -> Iterator[tuple[list[str], tuple]]:
    """(batch, encoded batch) in order, at most `depth` batches in flight (bounded memory,
    unlike Pool.imap, which reads its whole input ahead)."""
    pending: collections.deque = collections.deque()
    for batch in batched(texts, BATCH_DOCS):
        pending.append((len(batch), pool.apply_async(_worker_encode, (batch,))))
        if len(pending) >= depth:
            n, res = pending.popleft()
            yield n, res.get()
    while pending:
        n, res = pending.popleft()
        yield n, res.get()


class _Packer:
    """Writes one indexed dataset (prefix.bin/.idx) from encoded batches."""

    def __init__(self, prefix: Path, dtype, counts: np.ndarray | None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.dtype, self.counts = prefix, dtype, counts
        self.builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
        self.docs = self.tokens = self.sequences = self.skipped = 0

    def add(self, encoded: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        ids, lens, nseq = encoded
        tok_end = np.cumsum(lens)
        seq_at = 0
        for n in nseq.tolist():
            if n == 0:
                self.skipped += 1
                continue
            start = int(tok_end[seq_at - 1]) if seq_at else 0
            end = int(tok_end[seq_at + n - 1])
            self.builder.add_document(ids[start:end], lens[seq_at:seq_at + n].tolist())
            seq_at += n
            self.docs += 1
        self.sequences += int(lens.size)
        self.tokens += int(ids.size)
        if self.counts is not None and ids.size:
            self.counts += np.bincount(ids, minlength=self.counts.size)[: self.counts.size]

    def finalize(self) -> None:
        self.builder.finalize(str(self.prefix) + ".idx")


class PackStage(Stage):
    name = "pack"
    Config = PackConfig

    @classmethod
    def from_manifest(cls, loaded: Loaded) -> PackStage:
        m = loaded.manifest
        return cls(PackConfig(
            family=m.family,
            sources=[PackSource(name=s.name, weight=s.weight, epochs=s.epochs)
                     for s in m.corpus.sources],
            general_text=general_text(loaded)))

    def check(self) -> list[str]:
        return general_text_problems(self.config.general_text)

    def fingerprint(self) -> dict[str, str]:
        general = self.config.general_text
        if general is None:
            return {}
        return {"general_heldout": file_digest([Path(general)]) if Path(general).is_file()
                else "missing"}   # check() reports it

    def run(self, ctx: StageContext) -> dict[str, float]:
        from tokenization.io import iter_texts, shard_files
        from tokenization.megatron import MegatronTokenizer

        c = self.config
        corpus, out = Path(ctx.inputs["corpus"]), Path(ctx.out)
        tok_dir = Path(ctx.inputs["vocab"]) / "tokenizer"
        mt = MegatronTokenizer(tok_dir)
        tok = mt.backend
        vocab_size = mt.vocab_size
        dtype = token_dtype(vocab_size)
        counts = np.zeros(vocab_size, dtype=np.int64)
        docs_total = _corpus_docs(corpus)

        plan = [(s.name, shard_files(corpus / "train" / s.name, "*.jsonl.gz"), f"{s.name}_train",
                 counts) for s in c.sources]
        plan.append((HELDOUT_PREFIX, shard_files(corpus / "heldout", "*.jsonl.gz"),
                     HELDOUT_PREFIX, None))
        if c.general_text is not None:
            general = Path(c.general_text)
            plan.append((GENERAL_PREFIX, [general], GENERAL_PREFIX, None))
            docs_total += sum(1 for _ in iter_texts([general]))
        for name, files, _, _ in plan:
            if not files:
                where = "heldout" if name == HELDOUT_PREFIX else f"train/{name}"
                raise UserError(f"pack: {corpus / where} holds no *.jsonl.gz shards; rerun the "
                                "corpus stage (is the source named in corpus.sources?)")

        meta: dict = {"family": c.family, "vocab_size": vocab_size,
                      "dtype": np.dtype(dtype).name, "eod_id": mt.eod, "sources": {}}
        metrics: dict[str, float] = {}
        workers = c.workers or os.cpu_count() or 1
        pool = None
        if workers > 1:
            ctx_mp = multiprocessing.get_context("spawn")
            pool = ctx_mp.Pool(workers, _worker_init, (str(tok_dir), c.family, mt.eod, dtype))

        def encoded(files):
            if pool is None:
                for batch in batched(iter_texts(files), BATCH_DOCS):
                    yield len(batch), encode_docs(tok, batch, c.family, mt.eod, dtype)
            else:
                yield from _ordered(pool, iter_texts(files), 2 * workers)

        try:
            with ctx.track(docs_total, f"pack: tokenizing ({c.family})") as bar:
                for name, files, prefix, cnt in plan:
                    packer = _Packer(out / prefix, dtype, cnt)
                    for n, enc in encoded(files):
                        packer.add(enc)
                        bar.advance(n, tokens=packer.tokens)
                    packer.finalize()
                    self._record(name, prefix, packer, meta, metrics, ctx)
        finally:
            if pool is not None:
                pool.terminate()
        metrics["train_tokens"] = float(sum(s["tokens"] for s in meta["sources"].values()))
        np.save(out / "unigram_counts.npy", counts)
        (out / "pack.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        ctx.log.artifact(out / "pack.json")
        logger.info("pack: %d training tokens, %d held-out tokens (%s)",
                    metrics["train_tokens"], metrics["heldout_tokens"], meta["dtype"])
        return metrics

    def _record(self, name: str, prefix: str, packer: _Packer, meta: dict,
                metrics: dict[str, float], ctx: StageContext) -> None:
        """pack.json entry and metrics of one packed source."""
        c = self.config
        if packer.docs == 0:
            raise UserError(f"pack: source {name!r} yields no tokens; check the corpus")
        if packer.skipped:
            logger.warning("pack: %s: %d documents gave no tokens and were skipped",
                           name, packer.skipped)
        entry = {"prefix": prefix, "docs": packer.docs, "sequences": packer.sequences,
                 "tokens": packer.tokens}
        if name in (HELDOUT_PREFIX, GENERAL_PREFIX):
            meta[name] = entry
            metrics[f"{name}_tokens"] = float(packer.tokens)
        else:
            weight = next(s.weight for s in c.sources if s.name == name)
            meta["sources"][name] = {"prefix": prefix, "weight": weight,
                                     **{k: v for k, v in entry.items() if k != "prefix"}}
            metrics[f"{name}.tokens"] = float(packer.tokens)
            metrics[f"{name}.docs"] = float(packer.docs)
        ctx.log.metrics({f"{name}.tokens": float(packer.tokens)})


def _corpus_docs(corpus: Path) -> int | None:
    """Documents per corpus/stats.json, train and held-out (the progress total)."""
    try:
        stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
        return int(sum(s["docs"] for s in stats["sources"].values()) + stats["heldout"]["docs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
