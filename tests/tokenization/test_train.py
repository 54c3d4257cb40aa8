"""Tokenizer training on real PubMed text: every kind trains, saves, and loads with transformers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from factory.stage import UserError
from tokenization.train import (GPT_SPECIALS, WORDPIECE_SPECIALS, kind_of, lowercases,
                                save_tokenizer, train_tokenizer)

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed" / "train.jsonl.gz"
HELDOUT = REPO / "domains" / "biomedical" / "pubmed" / "heldout.jsonl.gz"


def texts(path: Path, n: int):
    """A generator (not a list): training must work from a stream."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n:
                return
            yield json.loads(line)["text"]


SAMPLE = ("Tocilizumab reduced IL-6 levels in naïve patients (p<0.05); "
          "Über-expression of TNF-α was seen.")


@pytest.mark.parametrize("kind,n_docs", [("wordpiece", 600), ("bpe", 600), ("byte_bpe", 600),
                                         ("unigram", 150)])
def test_each_kind_trains_saves_and_loads_with_autotokenizer(kind, n_docs, tmp_path):
    from transformers import AutoTokenizer

    casing = "uncased" if kind == "wordpiece" else "cased"
    tok = train_tokenizer(kind, 1200, casing, 2, texts(PUBMED, n_docs))
    specials = WORDPIECE_SPECIALS if kind == "wordpiece" else GPT_SPECIALS
    assert [tok.token_to_id(s) for s in specials] == list(range(len(specials)))
    assert 900 < tok.get_vocab_size() <= 1200
    assert kind_of(tok) == kind

    out = save_tokenizer(tok, kind, tmp_path / "tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file(), f
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.model_max_length == 512
    # transformers encodes exactly as the trained Rust tokenizer does
    for text in texts(HELDOUT, 20):
        assert hf(text)["input_ids"] == tok.encode(text).ids
    ids = hf(SAMPLE, add_special_tokens=False)["input_ids"]
    if kind == "wordpiece":
        assert type(hf).__name__ in ("BertTokenizer", "BertTokenizerFast")
        assert hf.do_lower_case is True
        assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id,
                hf.mask_token_id) == (0, 1, 2, 3, 4)
        full = hf(SAMPLE)["input_ids"]
        assert full[0] == 2 and full[-1] == 3 and full[1:-1] == ids
        assert hf.decode(ids).startswith("tocilizumab reduced il - 6")
        assert "naive" in hf.decode(ids)           # uncased strips accents too
        assert (out / "vocab.txt").read_text().splitlines()[:5] == WORDPIECE_SPECIALS
    else:
        assert (hf.eos_token, hf.bos_token, hf.pad_token, hf.unk_token) == (
            "<|endoftext|>", "<|endoftext|>", "<pad>", "<unk>")
        assert hf.pad_token_id != hf.eos_token_id   # megatron masks pad only if distinct
        decoded = hf.decode(ids)
        if kind == "byte_bpe":
            assert decoded == SAMPLE                 # bytes: every text round-trips
        else:
            assert decoded.startswith("Tocilizumab reduced IL-6 levels")  # cased kept


def test_cased_wordpiece_keeps_case_and_accents(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer("wordpiece", 1500, "cased", 2, texts(PUBMED, 600))
    assert not lowercases(tok)
    hf = AutoTokenizer.from_pretrained(save_tokenizer(tok, "wordpiece", tmp_path / "t"))
    assert hf.do_lower_case is False
    decoded = hf.decode(hf("Tocilizumab in naïve Patients", add_special_tokens=False)["input_ids"])
    assert decoded == "Tocilizumab in naïve Patients"


def test_unigram_training_is_reproducible():
    # raw trainer output differs between runs (char tail in hash order, float sums)
    runs = [train_tokenizer("unigram", 800, "cased", 2, texts(PUBMED, 80)) for _ in range(3)]
    vocabs = [[t.id_to_token(i) for i in range(t.get_vocab_size())] for t in runs]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    sample = list(texts(HELDOUT, 10))
    encs = [[e.ids for e in t.encode_batch(sample)] for t in runs]
    assert encs[0] == encs[1] == encs[2]


def test_wordpiece_ids_are_canonical():
    # The trainer numbers `##` pieces in hash-map order; ids are renumbered: specials, then by
    # (length, continuation, text). (Its merge choice on count ties can still differ between
    # runs: huggingface/tokenizers#1794.)
    tok = train_tokenizer("wordpiece", 1500, "uncased", 2, texts(PUBMED, 300))
    order = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    rest = order[len(WORDPIECE_SPECIALS):]
    assert order[:5] == WORDPIECE_SPECIALS
    assert rest == sorted(rest, key=lambda t: (len(t.removeprefix("##")), t.startswith("##"), t))


def test_min_frequency_prunes_rare_merges():
    loose = train_tokenizer("bpe", 5000, "cased", 1, texts(PUBMED, 200))
    strict = train_tokenizer("bpe", 5000, "cased", 50, texts(PUBMED, 200))
    assert strict.get_vocab_size() < loose.get_vocab_size()


def test_vocab_smaller_than_alphabet_is_a_user_error():
    with pytest.raises(UserError, match="alphabet"):
        train_tokenizer("wordpiece", 40, "uncased", 2, texts(PUBMED, 100))
    with pytest.raises(UserError, match="alphabet"):
        train_tokenizer("unigram", 40, "cased", 2, texts(PUBMED, 100))
    with pytest.raises(UserError, match="byte alphabet"):
        train_tokenizer("byte_bpe", 200, "cased", 2, texts(PUBMED, 10))


def test_empty_corpus_is_a_user_error():
    with pytest.raises(UserError, match="no text"):
        train_tokenizer("wordpiece", 1000, "uncased", 2, iter(["", ""]))


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("sentencepiece", 1000, "uncased", 2, texts(PUBMED, 5))


def test_pipeline_options_special_tokens_digits_accents(tmp_path):
    from transformers import AutoTokenizer

    from tokenization.train import TrainOptions

    opts = TrainOptions(strip_accents=True, special_tokens=("<|code|>", "<pad>"),
                        split_digits=True)
    tok = train_tokenizer("byte_bpe", 600, "cased", 2, texts(PUBMED, 200), opts)
    assert [tok.id_to_token(i) for i in range(4)] == GPT_SPECIALS + ["<|code|>"]  # no repeat
    text = "Naïve cohort in 2020 <|code|> done"
    pieces = tok.encode(text).tokens
    assert "<|code|>" in pieces                                  # never split
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["2", "0", "2", "0"]
    assert tok.decode(tok.encode(text).ids).startswith("Naive cohort in 2020")
    hf = AutoTokenizer.from_pretrained(save_tokenizer(tok, "byte_bpe", tmp_path / "t"))
    assert hf(text)["input_ids"] == tok.encode(text).ids


def test_cased_wordpiece_can_strip_accents_but_not_split_digits(tmp_path):
    from transformers import AutoTokenizer

    from tokenization.train import TrainOptions

    tok = train_tokenizer("wordpiece", 1200, "cased", 2, texts(PUBMED, 300),
                          TrainOptions(strip_accents=True))
    hf = AutoTokenizer.from_pretrained(save_tokenizer(tok, "wordpiece", tmp_path / "t"))
    ids = hf("Naïve Patients", add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == "Naive Patients"                   # accents gone, case kept
    assert ids == tok.encode("Naïve Patients", add_special_tokens=False).ids
    with pytest.raises(UserError, match="split_digits: not supported yet for wordpiece"):
        train_tokenizer("wordpiece", 1200, "uncased", 2, texts(PUBMED, 10),
                        TrainOptions(split_digits=True))
