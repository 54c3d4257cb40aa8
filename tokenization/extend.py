"""Extend a base tokenizer with the domain words that most reduce fragmentation.

The "amplified vocabulary" of continued pretraining: every base id stays where it is, and
K new entries are appended (ids base_size .. base_size+K-1). A candidate is a whole word of
the domain corpus, as the base tokenizer's normaliser and pre-tokeniser see it; its value is
the number of tokens it saves on the corpus, count x (pieces - 1). Ranking by that, not by
count, is the point: a frequent word the base already keeps whole (or cuts in two) is worth
less than a rarer term it cuts into seven pieces.

How an entry joins each model type (the rest of the pipeline is left as it was):
- WordPiece: a vocabulary entry; longest-match-first then takes the whole word.
- Unigram: a piece whose score (mean of its current pieces' scores) beats the current path.
- BPE / byte-level BPE: a chain of merges appended after the base merges (lowest priority),
  p1+p2, p1p2+p3, ...; the intermediate strings are vocabulary entries too and count
  against K, so K is always the growth of the vocabulary.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer

from factory.stage import UserError
from tokenization.fertility import BATCH, as_tokenizer
from tokenization.io import TOKENIZER_FILES, batched

logger = logging.getLogger(__name__)

# Base tokenizer files that describe the old vocabulary and cannot be rewritten here: a
# sentencepiece model would make transformers rebuild the base vocabulary from it.
STALE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class AddedEntry:
    """One appended vocabulary entry and the numbers that chose it."""

    id: int
    token: str                      # as stored in the vocabulary ("acetyl", "Ġacetyl", "▁acetyl")
    count: int                      # occurrences of the word in the corpus (0: BPE intermediate)
    base_pieces: tuple[str, ...]    # how the base tokenizer cut it
    pieces_after: int = 1           # pieces of the word with the extended tokenizer

    @property
    def tokens_saved(self) -> int:
        return self.count * (len(self.base_pieces) - self.pieces_after)


@dataclass
class Extension:
    tokenizer: Tokenizer
    base_size: int
    added: list[AddedEntry]
    corpus: dict[str, int] = field(default_factory=dict)   # words, tokens before/after

    @property
    def size(self) -> int:
        return self.base_size + len(self.added)


def _model_type(data: dict) -> str:
    t = data["model"].get("type")
    if t not in ("WordPiece", "BPE", "Unigram"):
        raise UserError(f"vocabulary extension of a {t} tokenizer is not supported yet "
                        "(WordPiece, BPE, byte-level BPE and Unigram are)")
    if t == "BPE" and (data["model"].get("continuing_subword_prefix")
                       or data["model"].get("end_of_word_suffix")):
        raise UserError("vocabulary extension of a BPE with subword prefixes/suffixes is not "
                        "supported yet")
    return t


def _word_form(pieces: tuple[str, ...], model: str, prefix: str) -> str:
    if model == "WordPiece":
        return pieces[0] + "".join(p[len(prefix):] if p.startswith(prefix) else p
                                   for p in pieces[1:])
    return "".join(pieces)


def count_words(tok: Tokenizer, texts: Iterable[str]) -> tuple[Counter, dict[str, int]]:
    """How often each word occurs, keyed by its base piece ids, plus corpus totals.

    A word is a pre-tokeniser unit (what the model segments on its own), so its count and
    pieces are exactly what an added entry changes.
    """
    tok = as_tokenizer(tok)
    counts: Counter = Counter()
    totals = {"docs": 0, "tokens": 0}

    for batch in batched(texts, BATCH, totals):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            ids, wids = enc.ids, enc.word_ids
            totals["tokens"] += len(ids)
            start = 0
            for i in range(1, len(ids) + 1):
                if i == len(ids) or wids[i] != wids[start]:
                    counts[tuple(ids[start:i])] += 1
                    start = i
    return counts, totals


def _specials(data: dict) -> set[str]:
    return {a["content"] for a in data.get("added_tokens", [])}


def extend_tokenizer(base, texts: Iterable[str], add: int, min_count: int = 2) -> Extension:
    """The base tokenizer plus up to `add` entries chosen on `texts` (consumed once).

    `base` is anything `fertility.as_tokenizer` takes (a folder, a tokenizer.json, a
    `tokenizers.Tokenizer`). Raises UserError when there is no text or nothing to add.
    """
    if add < 1:
        raise UserError(f"--add {add}: add at least one token")
    base_tok = as_tokenizer(base)
    data = json.loads(base_tok.to_str())
    model = _model_type(data)
    prefix = data["model"].get("continuing_subword_prefix") or "##"
    unk = data["model"].get("unk_token")
    specials = _specials(data)
    # ids, not strings: an unknown character comes back as itself, with the unknown id
    skip = {base_tok.token_to_id(t) for t in specials | {unk or ""}} - {None}
    base_size = base_tok.get_vocab_size(with_added_tokens=True)
    vocab_ids = base_tok.get_vocab(with_added_tokens=True)
    first_id = max(base_size, max(vocab_ids.values()) + 1)

    id_counts, totals = count_words(base_tok, texts)
    counts: Counter = Counter()
    kept: Counter = Counter()    # words with an unknown/special piece: their text is lost
    for ids, n in id_counts.items():
        if skip.intersection(ids):
            kept[len(ids)] += n
        else:
            counts[tuple(base_tok.id_to_token(i) for i in ids)] += n
    if not totals["docs"]:
        raise UserError("no text to choose the added tokens from (the input is empty)")
    cands: list[tuple[int, str, int, tuple[str, ...]]] = []
    for pieces, n in counts.items():
        if len(pieces) < 2 or n < min_count:
            continue
        form = _word_form(pieces, model, prefix)
        # letters only: a domain term is worth an entry, a number or a formula fragment is not
        if not any(ch.isalpha() for ch in form):
            continue
        cands.append((n * (len(pieces) - 1), form, n, pieces))
    cands.sort(key=lambda c: (-c[0], c[1]))

    added: list[AddedEntry] = []
    next_id = first_id
    mvocab = data["model"]["vocab"]
    if model == "Unigram":
        if len(mvocab) != first_id:   # a Unigram id is a list position
            raise UserError(f"vocabulary extension of a Unigram tokenizer with tokens beyond its "
                            f"model ({first_id - len(mvocab)} added) is not supported yet")
        scores = {p: s for p, s in mvocab}
        known = set(scores)
    else:
        known = set(mvocab)
    merges = data["model"].get("merges") if model == "BPE" else None
    merge_set = ({tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges}
                 if merges is not None else set())
    for _, form, n, pieces in cands:
        if len(added) >= add:
            break
        if form in known and model != "BPE":
            continue
        if model == "WordPiece":
            mvocab[form] = next_id
        elif model == "Unigram":
            score = sum(scores[p] for p in pieces) / len(pieces)
            mvocab.append([form, score])
            scores[form] = score
        else:
            chain, cur = [], pieces[0]
            for p in pieces[1:]:
                chain.append((cur, p))
                cur += p
            inter = [s for s in dict.fromkeys(a + b for a, b in chain[:-1]) if s not in known]
            if len(added) + len(inter) + (form not in known) > add:
                continue
            for a, b in chain:
                if (a, b) not in merge_set:
                    merges.append([a, b] if not merges or isinstance(merges[0], list)
                                  else f"{a} {b}")
                    merge_set.add((a, b))
            for s in inter:
                mvocab[s] = next_id
                known.add(s)
                added.append(AddedEntry(next_id, s, 0, ()))
                next_id += 1
            if form in known:     # reachable now through the new merges, no entry needed
                continue
            mvocab[form] = next_id
        known.add(form)
        added.append(AddedEntry(next_id, form, n, pieces))
        next_id += 1
    if not added:
        raise UserError(f"no word of the input is cut into several pieces at least {min_count} "
                        "times: nothing worth adding")

    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    _measure(tok, added, counts, totals, model, prefix)
    totals["tokens_after"] += sum(k * n for k, n in kept.items())
    logger.info("extended a %s vocabulary of %d by %d entries: %d -> %d tokens on %d documents",
                model, base_size, len(added), totals["tokens"], totals["tokens_after"],
                totals["docs"])
    return Extension(tok, first_id, added, totals)


def _measure(tok: Tokenizer, added: list[AddedEntry], counts: Counter, totals: dict,
             model: str, prefix: str) -> None:
    """Pieces of each added word under the extended tokenizer, and the corpus token count
    after extension (recomputed from the word counts: each word segmented once)."""
    m = tok.model
    seg: dict[tuple[str, ...], int] = {}
    after = 0
    for pieces, n in counts.items():
        if len(pieces) > 1:
            k = len(m.tokenize(_word_form(pieces, model, prefix)))
            seg[pieces] = k
        else:
            k = len(pieces)
        after += n * k
    totals["tokens_after"] = after
    for e in added:
        if e.base_pieces:
            e.pieces_after = seg.get(e.base_pieces, 1)


def save_extension(ext: Extension, base_folder: str | Path | None, out_dir: str | Path) -> Path:
    """Write the extended tokenizer folder: the base's transformers files with tokenizer.json
    (and vocab.txt / vocab.json + merges.txt where the base has them) rewritten, plus
    added_tokens.tsv (the chosen entries and their statistics). AutoTokenizer loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base_folder) if base_folder is not None else None
    if base is not None and base.is_file():
        base = base.parent
    if base is not None:
        for name in TOKENIZER_FILES:
            if name in STALE_FILES:
                continue
            if (base / name).is_file() and not (out / name).exists():
                shutil.copy2(base / name, out / name)
        stale = [n for n in STALE_FILES if (base / n).is_file()]
        if stale:
            logger.info("extension: not copying %s (it describes the base vocabulary only)",
                        ", ".join(stale))
    data = json.loads(ext.tokenizer.to_str())
    base_json = base / "tokenizer.json" if base is not None else None
    if base_json is not None and base_json.is_file():
        # the base's own truncation/padding settings travel with it (measuring turned them off)
        raw = json.loads(base_json.read_text(encoding="utf-8"))
        data["truncation"], data["padding"] = raw.get("truncation"), raw.get("padding")
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2),
                                        encoding="utf-8")
    if (out / "vocab.txt").is_file() and data["model"]["type"] == "WordPiece":
        vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    if (out / "vocab.json").is_file() and data["model"]["type"] == "BPE":
        (out / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False),
                                        encoding="utf-8")
        if (out / "merges.txt").is_file():
            lines = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
            (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n",
                                            encoding="utf-8")
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n", encoding="utf-8")
    write_added_tsv(ext.added, out / "added_tokens.tsv")
    return out


def extension_info(ext: Extension, base: str | Path) -> dict:
    """What extension.json holds: {"base", "added", "base_size", "size"} plus the token
    counts of the choosing corpus before and after ("tokens", "tokens_after", "docs")."""
    return {"base": str(base), "added": len(ext.added), "base_size": ext.base_size,
            "size": ext.size, **ext.corpus}


def write_added_tsv(added: list[AddedEntry], path: Path) -> None:
    rows = ["id\ttoken\tcount\tbase_pieces\tpieces_after\ttokens_saved\tbase_segmentation"]
    for e in added:
        rows.append("\t".join(map(str, (e.id, e.token, e.count, len(e.base_pieces),
                                        e.pieces_after, e.tokens_saved,
                                        " ".join(e.base_pieces)))))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
