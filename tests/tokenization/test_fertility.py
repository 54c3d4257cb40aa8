"""Fertility numbers on texts small enough to check by hand."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from tokenization.fertility import fertility_report, word_pieces


def hand_wordpiece() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "un", "##happi", "##ness",
         "sat", ".", "dog", "##s"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # a post-processor that adds specials: the report must not count them
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def test_wordpiece_fertility_by_hand():
    # the(1) cat(1) sat.(2: sat .) unhappiness(3: un ##happi ##ness) dogs(2: dog ##s)
    tok = hand_wordpiece()
    pieces = list(word_pieces(tok, ["The cat sat.", "  unhappiness\ndogs "]))
    assert pieces == [("The", 1), ("cat", 1), ("sat.", 2), ("unhappiness", 3), ("dogs", 2)]
    r = fertility_report(tok, ["The cat sat.", "  unhappiness\ndogs "])
    assert r["words"] == 5 and r["tokens"] == 9
    assert r["fertility"] == pytest.approx(9 / 5)
    assert r["split_share"] == pytest.approx(3 / 5)
    assert r["pieces_per_split_word"] == pytest.approx(7 / 3)


def test_truncation_of_a_loaded_tokenizer_is_ignored():
    tok = hand_wordpiece()
    tok.enable_truncation(max_length=3)
    text = "the cat sat . the cat sat ."
    assert fertility_report(tok, [text])["tokens"] == 8
    assert tok.truncation is not None            # the caller's tokenizer is left as it was


def test_word_start_markers_belong_to_the_next_word():
    # Metaspace BPE: "cat  cats" -> ▁cat | ▁ | ▁cat s ; the lone ▁ (the second space) starts "cats"
    vocab = {"▁": 0, "c": 1, "a": 2, "t": 3, "s": 4, "▁c": 5, "▁ca": 6, "▁cat": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "c"), ("▁c", "a"), ("▁ca", "t")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    assert tok.encode("cat  cats").tokens == ["▁cat", "▁", "▁cat", "s"]
    assert list(word_pieces(tok, ["cat  cats"])) == [("cat", 1), ("cats", 3)]
    r = fertility_report(tok, ["cat  cats"])
    assert (r["fertility"], r["split_share"], r["pieces_per_split_word"]) == (2.0, 0.5, 3.0)


def test_empty_input_gives_zeros():
    r = fertility_report(hand_wordpiece(), ["", "   "])
    assert r["words"] == 0 and r["fertility"] == 0.0 and r["split_share"] == 0.0


def test_accepts_a_tokenizer_folder(tmp_path):
    from tokenization.train import save_tokenizer

    folder = save_tokenizer(hand_wordpiece(), "wordpiece", tmp_path / "tok")
    assert fertility_report(folder, ["unhappiness dogs"])["tokens"] == 5
