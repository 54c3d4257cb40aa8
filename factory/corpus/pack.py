"""The pack stage: tokenize the corpus into megatron-core indexed datasets (.bin/.idx).

Reads corpus/train/<source>/*.jsonl.gz, corpus/heldout/*.jsonl.gz and vocab/tokenizer/;
writes <source>_train.bin/.idx per source, heldout.bin/.idx, unigram_counts.npy (int64 count
per token id over the training .bin files) and pack.json (the pack/ contract).

bert: a document is stored as its list of sentences, one sequence each (Megatron-LM's
preprocess_data.py --split-sentences), no special tokens: the BERT dataset adds [CLS]/[SEP].
gpt: a document is one sequence with the tokenizer's end-of-document id appended.
Tokenization is batched through the Rust tokenizer (encode_batch, parallel inside).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

BATCH_DOCS = 512
HELDOUT_PREFIX = "heldout"

# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by whitespace and
# a capital letter or digit (optionally after an opening quote/bracket); a line break always
# ends one (a title, a labelled abstract section). Simple on purpose: abbreviations such as
# "e.g. The" over-split, which costs BERT's next-sentence structure nothing it uses here.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` by the rule above; empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


class PackSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float = Field(gt=0)


class PackConfig(StageConfig):
    family: Literal["bert", "gpt"]
    sources: list[PackSource]


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while every id fits (what megatron's GPTDataset assumes for vocab <= 65536)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Packer:
    """Writes one indexed dataset (prefix.bin/.idx) from texts."""

    def __init__(self, prefix: Path, family: str, tok, eod: int, dtype, counts: np.ndarray | None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.family, self.tok, self.eod = prefix, family, tok, eod
        self.dtype, self.counts = dtype, counts
        self.builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
        self.docs = self.tokens = self.sequences = self.skipped = 0

    def add_batch(self, texts: list[str]) -> None:
        self._batch_ids: list[np.ndarray] = []
        self._encode(texts)
        if self.counts is not None and self._batch_ids:
            ids = np.concatenate(self._batch_ids)
            self.counts += np.bincount(ids, minlength=self.counts.size)[: self.counts.size]

    def _encode(self, texts: list[str]) -> None:
        if self.family == "gpt":
            encs = self.tok.encode_batch(texts, add_special_tokens=False)
            for enc in encs:
                if not enc.ids:
                    self.skipped += 1
                    continue
                ids = np.array(enc.ids + [self.eod], dtype=self.dtype)
                self._add(ids, [len(ids)])
            return
        per_doc = [split_sentences(t) for t in texts]
        flat = [s for sents in per_doc for s in sents]
        encs = iter(self.tok.encode_batch(flat, add_special_tokens=False) if flat else [])
        for sents in per_doc:
            pieces = [e.ids for e in (next(encs) for _ in sents)]
            pieces = [p for p in pieces if p]
            if not pieces:
                self.skipped += 1
                continue
            ids = np.fromiter((i for p in pieces for i in p), dtype=self.dtype)
            self._add(ids, [len(p) for p in pieces])

    def _add(self, ids: np.ndarray, lengths: list[int]) -> None:
        self.builder.add_document(ids, lengths)
        self.docs += 1
        self.sequences += len(lengths)
        self.tokens += int(ids.size)
        self._batch_ids.append(ids)

    def finalize(self) -> None:
        self.builder.finalize(str(self.prefix) + ".idx")


class PackStage(Stage):
    name = "pack"
    Config = PackConfig

    @classmethod
    def from_manifest(cls, loaded: "Loaded") -> "PackStage":
        m = loaded.manifest
        return cls(PackConfig(family=m.family, sources=[
            PackSource(name=s.name, weight=s.weight) for s in m.corpus.sources]))

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
        for name, files, _, _ in plan:
            if not files:
                where = "heldout" if name == HELDOUT_PREFIX else f"train/{name}"
                raise UserError(f"pack: {corpus / where} holds no *.jsonl.gz shards; rerun the "
                                "corpus stage (is the source named in corpus.sources?)")

        meta: dict = {"family": c.family, "vocab_size": vocab_size,
                      "dtype": np.dtype(dtype).name, "eod_id": mt.eod, "sources": {}}
        metrics: dict[str, float] = {}
        with ctx.track(docs_total, f"pack: tokenizing ({c.family})") as bar:
            for name, files, prefix, cnt in plan:
                packer = _Packer(out / prefix, c.family, tok, mt.eod, dtype, cnt)
                for batch in _batched(iter_texts(files), BATCH_DOCS):
                    packer.add_batch(batch)
                    bar.advance(len(batch), tokens=packer.tokens)
                packer.finalize()
                if packer.docs == 0:
                    raise UserError(f"pack: source {name!r} yields no tokens; check the corpus")
                if packer.skipped:
                    logger.warning("pack: %s: %d documents gave no tokens and were skipped",
                                   name, packer.skipped)
                entry = {"prefix": prefix, "docs": packer.docs, "sequences": packer.sequences,
                         "tokens": packer.tokens}
                if name == HELDOUT_PREFIX:
                    meta["heldout"] = entry
                    metrics["heldout_tokens"] = float(packer.tokens)
                else:
                    weight = next(s.weight for s in c.sources if s.name == name)
                    meta["sources"][name] = {"prefix": prefix, "weight": weight,
                                             **{k: v for k, v in entry.items() if k != "prefix"}}
                    metrics[f"{name}.tokens"] = float(packer.tokens)
                    metrics[f"{name}.docs"] = float(packer.docs)
                ctx.log.metrics({f"{name}.tokens": float(packer.tokens)})
        metrics["train_tokens"] = float(sum(s["tokens"] for s in meta["sources"].values()))
        np.save(out / "unigram_counts.npy", counts)
        (out / "pack.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        ctx.log.artifact(out / "pack.json")
        logger.info("pack: %d training tokens, %d held-out tokens (%s)",
                    metrics["train_tokens"], metrics["heldout_tokens"], meta["dtype"])
        return metrics


def _corpus_docs(corpus: Path) -> int | None:
    """Documents per corpus/stats.json, train and held-out (the progress total)."""
    try:
        stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
        return int(sum(s["docs"] for s in stats["sources"].values()) + stats["heldout"]["docs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
