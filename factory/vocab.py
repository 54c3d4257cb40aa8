"""The vocab stage: train the domain's vocabulary (scratch), adopt the base's (continued), or
extend the base's with the domain words that most reduce fragmentation (continued + extend).

Reads corpus/train/**/*.jsonl.gz (streamed) and corpus/heldout/; writes tokenizer/
(tokenizer.json + the transformers files, loads with AutoTokenizer), fertility.json (the
numbers on the held-out and general text, and the baseline's), report.md / report.png /
report.json (the same as a table and a bar plot) and, when extended, extension.json
({"base", "added", "base_size", "size", ...}) plus tokenizer/added_tokens.tsv. The pretrain
stage reads extension.json to resize and initialise the base model's embeddings
(tokenization.embeddings.extend_hf_model).
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
from tokenization.io import TOKENIZER_FILES

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

# transformers' default truncation length of the saved tokenizer. BERT keeps 512 learned
# positions whatever the pretraining length; a GPT's positions follow its seq_length, which
# the export stage knows (and this stage must not depend on: a new seq_length would retrain
# the vocabulary and repack the corpus).
MODEL_MAX_LENGTH = {"bert": 512, "gpt": 2048}
# General English for the report (Brown + Wikipedia, see domains/general/PROVENANCE.md): how
# much the domain vocabulary costs outside its domain.
GENERAL_TEXT = Path(__file__).resolve().parents[1] / "domains" / "general" / "heldout.jsonl.gz"


def general_text(loaded: "Loaded") -> str | None:
    """The run's general-language held-out text: corpus.general_text, else the shipped sample."""
    given = loaded.manifest.corpus.general_text
    if given is not None:
        return str(loaded.resolve(given))
    return str(GENERAL_TEXT) if GENERAL_TEXT.is_file() else None


def general_text_problems(path: str | None) -> list[str]:
    if path is None or Path(path).is_file():
        return []
    return [f"corpus.general_text: {path} does not exist; give a JSON Lines file with a `text` "
            "field, or drop the field for the shipped English sample"]


class VocabConfig(StageConfig):
    family: Literal["bert", "gpt"]
    source: Literal["train", "base"] = Field(description="train a vocabulary, or copy the base's")
    kind: Literal["wordpiece", "bpe", "byte_bpe", "unigram"] | None = None
    vocab_size: int | None = None
    casing: Literal["uncased", "cased"] | None = None
    min_frequency: int | None = None
    base: str | None = Field(None, description="Resolved base HF folder (continued runs)")
    add: int | None = Field(None, description="Entries to add to the base tokenizer (extend)")
    min_count: int = Field(2, description="Extension: ignore words seen fewer times")
    baseline: str | None = Field(None, description="Resolved tokenizer the report compares with")
    general_text: str | None = Field(None, description="General-language JSON Lines for the "
                                     "report (corpus.general_text)")
    strip_accents: bool | None = None
    special_tokens: list[str] = []
    split_digits: bool = False
    sentencepiece: bool = Field(False, description="unigram trained by sentencepiece")


class VocabStage(Stage):
    name = "vocab"
    Config = VocabConfig

    @classmethod
    def from_manifest(cls, loaded: "Loaded") -> "VocabStage":
        m = loaded.manifest
        t = m.tokenizer
        general = general_text(loaded)
        baseline = _resolve_tokenizer(t.baseline, loaded) if t and t.baseline else None
        if m.strategy == "continued":
            from factory import base_checkpoint

            base = base_checkpoint.resolve(m.base.path, loaded.root)
            ext = t.extend if t is not None else None
            return cls(VocabConfig(
                family=m.family, source="base", base=str(base),
                add=ext.add if ext else None, min_count=ext.min_count if ext else 2,
                baseline=baseline, general_text=general))
        if t.extend is not None:
            raise UserError("tokenizer.extend: only a continued run extends a base vocabulary; "
                            "remove it or set strategy: continued")
        return cls(VocabConfig(family=m.family, source="train", kind=t.kind,
                               vocab_size=t.vocab_size, casing=t.casing,
                               min_frequency=t.min_frequency, baseline=baseline,
                               general_text=general, strip_accents=t.strip_accents,
                               special_tokens=list(t.special_tokens),
                               split_digits=t.split_digits, sentencepiece=t.sentencepiece))

    def _base_files(self) -> list[Path]:
        base = Path(self.config.base or "")
        return [base / f for f in TOKENIZER_FILES if (base / f).is_file()]

    def check(self) -> list[str]:
        c = self.config
        problems = general_text_problems(c.general_text)
        if c.baseline is not None and not _has_tokenizer(Path(c.baseline)):
            problems.append(f"tokenizer.baseline: {c.baseline} holds no tokenizer.json or "
                            "vocab.txt; give a tokenizer folder")
        if c.source == "base":
            if not self._base_files():
                names = ", ".join(TOKENIZER_FILES[:4])
                problems.append(f"base.path: {c.base} has no tokenizer files ({names}, ...); "
                                "use a base folder that ships its tokenizer")
            return problems
        if c.add is not None:
            problems.append("tokenizer.extend: only a continued run extends a base vocabulary")
        if c.sentencepiece and c.kind != "unigram":
            problems.append(f"tokenizer.sentencepiece: not supported yet for {c.kind} (only "
                            "unigram)")
        if c.kind is None or c.vocab_size is None:
            problems.append("tokenizer: a scratch run needs tokenizer.kind and "
                            "tokenizer.vocab_size")
        return problems

    def fingerprint(self) -> dict[str, str]:
        c = self.config
        fp = {}
        if c.source == "base":
            fp["base_tokenizer"] = file_digest(self._base_files())
        if c.baseline is not None:
            fp["baseline_tokenizer"] = file_digest(_tokenizer_files(Path(c.baseline)))
        if c.general_text is not None and Path(c.general_text).is_file():
            fp["general_text"] = file_digest([Path(c.general_text)])
        return fp

    def run(self, ctx: StageContext) -> dict[str, float]:
        from tokenization.io import iter_texts, shard_files
        from tokenization.train import (TrainOptions, kind_of, load_backend, save_tokenizer,
                                        train_tokenizer)

        c = self.config
        corpus = Path(ctx.inputs["corpus"])
        out = Path(ctx.out)
        tok_dir = out / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        train_files = shard_files(corpus / "train", "**/*.jsonl.gz")
        heldout_files = shard_files(corpus / "heldout", "**/*.jsonl.gz")
        if (c.source == "train" or c.add) and not train_files:
            raise UserError(f"vocab: {corpus / 'train'} holds no *.jsonl.gz shards; "
                            "rerun the corpus stage")
        if not heldout_files:
            raise UserError(f"vocab: {corpus / 'heldout'} holds no *.jsonl.gz shards; "
                            "rerun the corpus stage")

        def counted(bar):
            for t in iter_texts(train_files):
                bar.advance(1)
                yield t

        metrics: dict[str, float] = {}
        base_tok = None
        if c.source == "base" and c.add:
            from tokenization.extend import extend_tokenizer, extension_info, save_extension

            base_tok = load_backend(c.base)[0]
            with ctx.track(_corpus_docs(corpus), f"vocab: choosing {c.add} entries") as bar:
                ext = extend_tokenizer(base_tok, counted(bar), c.add, min_count=c.min_count)
            save_extension(ext, c.base, tok_dir)
            tok, kind = ext.tokenizer, kind_of(ext.tokenizer)
            info = extension_info(ext, c.base)
            (out / "extension.json").write_text(json.dumps(info, indent=2) + "\n",
                                                encoding="utf-8")
            ctx.log.artifact(out / "extension.json")
            saved = 1 - ext.corpus["tokens_after"] / max(ext.corpus["tokens"], 1)
            metrics.update(added_tokens=float(len(ext.added)),
                           train_token_reduction_pct=100.0 * saved)
            logger.info("vocab: extended the %s tokenizer of %s by %d entries (%d -> %d)", kind,
                        c.base, len(ext.added), ext.base_size, ext.size)
        elif c.source == "base":
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
            with ctx.track(_corpus_docs(corpus), f"vocab: training {c.kind} ({c.vocab_size})") \
                    as bar:
                options = TrainOptions(strip_accents=c.strip_accents,
                                       special_tokens=tuple(c.special_tokens),
                                       split_digits=c.split_digits)
                if c.sentencepiece:
                    from tokenization.sentencepiece_train import train_sentencepiece

                    tok = train_sentencepiece(c.vocab_size, c.casing, counted(bar), options)
                else:
                    tok = train_tokenizer(c.kind, c.vocab_size, c.casing, c.min_frequency,
                                          counted(bar), options)
            kind = c.kind
            save_tokenizer(tok, kind, tok_dir, model_max_length=MODEL_MAX_LENGTH[c.family],
                           casing=c.casing)

        if c.family == "bert" and kind != "wordpiece":
            raise UserError(f"vocab: family bert needs a WordPiece tokenizer (whole-word "
                            f"masking); {c.base or 'the tokenizer'} is {kind}")
        if c.family == "gpt" and kind == "wordpiece":
            raise UserError(f"vocab: family gpt needs a BPE, byte-level BPE or unigram "
                            f"tokenizer; {c.base or 'the tokenizer'} is WordPiece")
        metrics.update(self._report(ctx, tok, kind, base_tok, iter_texts(heldout_files)))
        ctx.log.artifact(tok_dir, "tokenizer")
        return metrics

    def _report(self, ctx: StageContext, tok, kind: str, base_tok,
                heldout) -> dict[str, float]:
        """fertility.json + report.{json,md,png}: this tokenizer (and the baseline: the base
        of an extension, else tokenizer.baseline) on held-out and general text."""
        from tokenization.io import iter_texts
        from tokenization.report import compare, write_report
        from tokenization.train import load_backend

        c = self.config
        out = Path(ctx.out)
        name = "extended" if base_tok is not None else ("base" if c.source == "base"
                                                        else "domain")
        toks = {name: tok}
        if base_tok is not None:
            toks["base"] = base_tok
        elif c.baseline is not None:
            toks["baseline"] = load_backend(c.baseline)[0]
        sets = {"heldout": list(heldout)}
        if c.general_text is not None and Path(c.general_text).is_file():
            sets["general"] = list(iter_texts([c.general_text]))
        else:
            logger.info("vocab: no general text (%s): the report covers held-out text only",
                        c.general_text or "none configured")
        results = compare(toks, sets)
        fert = {"kind": kind, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                **{s: results[s][name] for s in sets}}
        other = next((k for k in toks if k != name), None)
        if other is not None:
            fert["baseline"] = {"name": other, "tokenizer": c.base if other == "base"
                                else c.baseline, **{s: results[s][other] for s in sets}}
        (out / "fertility.json").write_text(json.dumps(fert, indent=2) + "\n", encoding="utf-8")
        files = write_report(results, out, title=f"vocabulary: {name} ({kind}, "
                             f"{fert['vocab_size']:,})" + (f" vs {other}" if other else ""))
        for f in (out / "fertility.json", *files.values()):
            ctx.log.artifact(f)

        metrics = {"vocab_size": float(fert["vocab_size"])}
        for s in sets:
            r = results[s][name]
            metrics.update({f"{s}_fertility": r["fertility"], f"{s}_split_share": r["split_share"],
                            f"{s}_pieces_per_split_word": r["pieces_per_split_word"],
                            f"{s}_coverage_top1000": r["coverage_top1000"]})
            if other is not None:
                b = results[s][other]
                metrics[f"baseline_{s}_fertility"] = b["fertility"]
                metrics[f"{s}_fertility_reduction_pct"] = 100.0 * (1 - r["fertility"]
                                                               / b["fertility"])
        ctx.log.metrics(metrics)
        h = results["heldout"][name]
        logger.info("vocab: %s, %d entries; held-out fertility %.3f tokens/word, %.1f%% of "
                    "words split", kind, fert["vocab_size"], h["fertility"],
                    100 * h["split_share"])
        return metrics


def _tokenizer_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    return [p / f for f in TOKENIZER_FILES if (p / f).is_file()]


def _has_tokenizer(p: Path) -> bool:
    return any(f.name in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
               for f in _tokenizer_files(p))


def _resolve_tokenizer(spec: str, loaded: "Loaded") -> str:
    """A local tokenizer folder / tokenizer.json (relative to the manifest), else a base
    checkpoint spec (package:MODULE/SUBDIR or a hub id)."""
    local = loaded.resolve(spec)
    if local.exists() or spec.startswith((".", "/", "~")):
        return str(local)
    from factory import base_checkpoint

    return str(base_checkpoint.resolve(spec, loaded.root))


def _corpus_docs(corpus: Path) -> int | None:
    """Training documents per corpus/stats.json (the progress total); None when unknown."""
    try:
        stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
        return int(sum(s["docs"] for s in stats["sources"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
