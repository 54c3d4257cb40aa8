"""A unigram vocabulary trained by sentencepiece, saved as our `unigram` pipeline."""

from __future__ import annotations

import io

import pytest

from factory.stage import UserError
from tokenization.train import GPT_SPECIALS, TrainOptions, kind_of, save_tokenizer

from tests.tokenization.test_extend import pubmed

spm = pytest.importorskip("sentencepiece")


def test_segments_exactly_as_sentencepiece_and_loads_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    from tokenization.sentencepiece_train import train_sentencepiece

    proto = io.BytesIO()
    tok = train_sentencepiece(600, "uncased", iter(pubmed(100)),
                              TrainOptions(special_tokens=("<ent>",)), model_out=proto)
    assert tok.get_vocab_size() == 600 and kind_of(tok) == "unigram"
    assert [tok.id_to_token(i) for i in range(4)] == GPT_SPECIALS + ["<ent>"]
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    held = pubmed(25, skip=100)
    for text in held:        # sentencepiece on our normalised text == the Rust pipeline
        assert sp.encode(tok.normalizer.normalize_str(text), out_type=str) == \
            tok.encode(text).tokens
    hf = AutoTokenizer.from_pretrained(save_tokenizer(tok, "unigram", tmp_path / "t"))
    assert [hf(t)["input_ids"] for t in held[:5]] == [tok.encode(t).ids for t in held[:5]]
    assert "<ent>" in hf.tokenize("a <ent> b")          # a special is never split


def test_empty_input_is_a_user_error():
    from tokenization.sentencepiece_train import train_sentencepiece

    with pytest.raises(UserError, match="no text"):
        train_sentencepiece(500, "cased", iter(["", ""]))


def test_too_small_vocabulary_is_a_user_error():
    from tokenization.sentencepiece_train import train_sentencepiece

    with pytest.raises(UserError, match="smaller than the alphabet"):
        train_sentencepiece(20, "cased", iter(pubmed(20)))
