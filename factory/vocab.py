"""The vocab stage: train the domain's vocabulary (scratch) or adopt the base's (continued).

Reads corpus/train/**/*.jsonl.gz (streamed) and corpus/heldout/; writes tokenizer/
(tokenizer.json + the transformers files, loads with AutoTokenizer) and fertility.json (the
tokenizer's fertility on the held-out text).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

# What a transformers tokenizer folder may hold; copied as is from a continued run's base.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
# transformers' default truncation length of the saved tokenizer. BERT keeps 512 learned
# positions whatever the pretraining length; a GPT's positions follow its seq_length, which
# the export stage knows (and this stage must not depend on: a new seq_length would retrain
# the vocabulary and repack the corpus).
MODEL_MAX_LENGTH = {"bert": 512, "gpt": 2048}


class VocabConfig(StageConfig):
    family: Literal["bert", "gpt"]
    source: Literal["train", "base"] = Field(description="train a vocabulary, or copy the base's")
    kind: Literal["wordpiece", "bpe", "byte_bpe", "unigram"] | None = None
    vocab_size: int | None = None
    casing: Literal["uncased", "cased"] | None = None
    min_frequency: int | None = None
    base: str | None = Field(None, description="Resolved base HF folder (continued runs)")


class VocabStage(Stage):
    name = "vocab"
    Config = VocabConfig

    @classmethod
    def from_manifest(cls, loaded: "Loaded") -> "VocabStage":
        m = loaded.manifest
        if m.strategy == "continued":
            from factory import base_checkpoint

            base = base_checkpoint.resolve(m.base.path, loaded.root)
            return cls(VocabConfig(family=m.family, source="base", base=str(base)))
        t = m.tokenizer
        return cls(VocabConfig(family=m.family, source="train", kind=t.kind,
                               vocab_size=t.vocab_size, casing=t.casing,
                               min_frequency=t.min_frequency))

    def _base_files(self) -> list[Path]:
        base = Path(self.config.base or "")
        return [base / f for f in TOKENIZER_FILES if (base / f).is_file()]

    def check(self) -> list[str]:
        c = self.config
        if c.source == "base":
            if not self._base_files():
                names = ", ".join(TOKENIZER_FILES[:4])
                return [f"base.path: {c.base} has no tokenizer files ({names}, ...); use a "
                        "base folder that ships its tokenizer"]
            return []
        if c.kind is None or c.vocab_size is None:
            return ["tokenizer: a scratch run needs tokenizer.kind and tokenizer.vocab_size"]
        return []

    def fingerprint(self) -> dict[str, str]:
        if self.config.source != "base":
            return {}
        return {"base_tokenizer": file_digest(self._base_files())}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from tokenization.fertility import fertility_report
        from tokenization.io import iter_texts, shard_files
        from tokenization.train import kind_of, load_backend, save_tokenizer, train_tokenizer

        c = self.config
        corpus = Path(ctx.inputs["corpus"])
        out = Path(ctx.out)
        tok_dir = out / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        train_files = shard_files(corpus / "train", "**/*.jsonl.gz")
        heldout_files = shard_files(corpus / "heldout", "**/*.jsonl.gz")

        if c.source == "base":
            tok_dir.mkdir(parents=True)
            for f in self._base_files():
                shutil.copy2(f, tok_dir / f.name)
            if not (tok_dir / "tokenizer.json").is_file():
                # A base with only vocab.txt / a sentencepiece model: add the Rust tokenizer
                # converted by transformers (the rest of the factory reads tokenizer.json).
                tok, _, text = load_backend(tok_dir)
                (tok_dir / "tokenizer.json").write_text(text, encoding="utf-8")
            tok = load_backend(tok_dir)[0]
            kind = kind_of(tok)
            logger.info("vocab: adopted the %s tokenizer of %s", kind, c.base)
        else:
            if not train_files:
                raise UserError(f"vocab: {corpus / 'train'} holds no *.jsonl.gz shards; "
                                "rerun the corpus stage")
            n_docs = _corpus_docs(corpus)
            with ctx.track(n_docs, f"vocab: training {c.kind} ({c.vocab_size})") as bar:
                def texts():
                    for t in iter_texts(train_files):
                        bar.advance(1)
                        yield t
                tok = train_tokenizer(c.kind, c.vocab_size, c.casing, c.min_frequency, texts())
            kind = c.kind
            save_tokenizer(tok, kind, tok_dir, model_max_length=MODEL_MAX_LENGTH[c.family],
                           casing=c.casing)

        if c.family == "bert" and kind != "wordpiece":
            raise UserError(f"vocab: family bert needs a WordPiece tokenizer (whole-word "
                            f"masking); {c.base or 'the tokenizer'} is {kind}")
        if c.family == "gpt" and kind == "wordpiece":
            raise UserError(f"vocab: family gpt needs a BPE, byte-level BPE or unigram "
                            f"tokenizer; {c.base or 'the tokenizer'} is WordPiece")
        if not heldout_files:
            raise UserError(f"vocab: {corpus / 'heldout'} holds no *.jsonl.gz shards; "
                            "rerun the corpus stage")
        report = fertility_report(tok, iter_texts(heldout_files))
        report = {"kind": kind, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                  "heldout": report}
        (out / "fertility.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        ctx.log.artifact(tok_dir, "tokenizer")
        ctx.log.artifact(out / "fertility.json")
        h = report["heldout"]
        logger.info("vocab: %s, %d entries; held-out fertility %.3f tokens/word, %.1f%% of "
                    "words split", kind, report["vocab_size"], h["fertility"],
                    100 * h["split_share"])
        return {"vocab_size": float(report["vocab_size"]),
                "heldout_fertility": float(h["fertility"]),
                "heldout_split_share": float(h["split_share"])}


def _corpus_docs(corpus: Path) -> int | None:
    """Training documents per corpus/stats.json (the progress total); None when unknown."""
    try:
        stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
        return int(sum(s["docs"] for s in stats["sources"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
