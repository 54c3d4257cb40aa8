"""Training data from a pack/ folder: determinism by index, blend shares, BERT masking."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from factory.stage import UserError

SEQ = 64


@pytest.fixture(scope="module", autouse=True)
def process_group():
    from factory.train import parallel

    parallel.init(seed=1234)


def _build(family, inputs, cache, n=400, seed=1234, mask_prob=0.15):
    from factory.train import data

    # A fresh tokenizer object each time: its vocab dicts come from a Rust hash map whose
    # order differs between instances (and processes).
    tok = data.load_tokenizer(inputs["vocab"] / "tokenizer")
    return data.build_train_dataset(family, inputs["pack"], tok, SEQ, n, seed, cache,
                                    mask_prob=mask_prob)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_same_index_same_sample_across_builds(family, request, tmp_path):
    inputs = request.getfixturevalue(f"{family}_inputs")
    a = _build(family, inputs, tmp_path / "cache_a")
    b = _build(family, inputs, tmp_path / "cache_b")
    assert len(a) >= 400
    assert any((tmp_path / "cache_a").iterdir()), "index caches belong in the given folder"
    for start in (0, 37, 391):
        ba, bb = a.batch(start, 8), b.batch(start, 8)
        for key in ba:
            assert torch.equal(ba[key], bb[key]), (key, start)
    # A different seed is a different stream.
    c = _build(family, inputs, tmp_path / "cache_c", seed=99)
    assert not torch.equal(a.batch(0, 8)["tokens"], c.batch(0, 8)["tokens"])


def test_gpt_sample_layout(gpt_inputs, tmp_path):
    d = _build("gpt", gpt_inputs, tmp_path / "cache")
    b = d.batch(5, 4)
    assert b["tokens"].shape == b["labels"].shape == (4, SEQ)
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])     # next-token targets
    assert torch.equal(b["position_ids"][0], torch.arange(SEQ))
    assert b["loss_mask"].sum() == 4 * SEQ


def test_bert_masking(bert_inputs, tmp_path):
    from factory.train import data

    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    d = _build("bert", bert_inputs, tmp_path / "cache", n=600)
    b = d.batch(0, 600)
    real = b["attention_mask"].bool()
    special = (b["tokens"] == tok.cls) | (b["tokens"] == tok.sep)
    assert torch.all(b["tokens"][:, 0] == tok.cls)
    assert torch.all(b["tokens"][~real] == tok.pad)
    masked = b["loss_mask"].bool()
    assert not torch.any(masked & (~real | special))
    share = masked.sum().item() / (real & ~special).sum().item()
    assert 0.12 < share < 0.16
    # The masked positions come with the batch in megatron's [s, b] order (row-major over
    # the transpose), for the MLM head to gather without a device sync.
    rows, cols = masked.numpy().T.nonzero()
    assert b["masked_positions"].tolist() == (rows * 600 + cols).tolist()

    # 80% [MASK], 10% a random token, 10% unchanged (Devlin et al. 2019, 3.1).
    inputs, labels = b["tokens"][masked], b["labels"][masked]
    n = len(labels)
    to_mask = (inputs == tok.mask).sum().item() / n
    unchanged = (inputs == labels).sum().item() / n
    assert 0.77 < to_mask < 0.83
    assert 0.07 < unchanged < 0.13
    assert 0.07 < 1 - to_mask - unchanged < 0.13

    # Whole words: a masked continuation piece (##x) has its word's previous piece masked too,
    # except right after [CLS], where truncation may have cut the word's start off.
    inv = tok.inv_vocab
    rows, cols = torch.nonzero(masked, as_tuple=True)
    cont = [(r, c) for r, c in zip(rows.tolist(), cols.tolist())
            if c > 1 and inv[int(b["labels"][r, c])].startswith("##")]
    assert len(cont) > 20
    bad = [(r, c) for r, c in cont if not masked[r, c - 1]]
    assert not bad, (bad[:10], len(cont))


def test_mask_prob_is_used(bert_inputs, tmp_path):
    d = _build("bert", bert_inputs, tmp_path / "cache", n=300, mask_prob=0.4)
    b = d.batch(0, 300)
    share = b["loss_mask"].sum().item() / (b["attention_mask"].sum().item() - 2 * 300)
    assert 0.35 < share < 0.42


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_blend_shares_follow_weights(family, blend_inputs, tmp_path):
    inputs = blend_inputs[family]
    weights = {n: s["weight"] for n, s in
               json.loads((inputs["pack"] / "pack.json").read_text())["sources"].items()}
    d = _build(family, inputs, tmp_path / "cache", n=2000)
    counts = Counter(int(d.sample(i)["dataset_id"]) for i in range(2000))
    names = list(weights)          # megatron numbers the datasets in blend order
    for i, name in enumerate(names):
        assert counts[i] / 2000 == pytest.approx(weights[name] / sum(weights.values()), abs=0.01)
    # The small source (100 abstracts, weight 0.7) is drawn from over more than one epoch.
    smallest = min(json.loads((inputs["pack"] / "pack.json").read_text())["sources"].items(),
                   key=lambda kv: kv[1]["docs"])[0]
    assert counts[names.index(smallest)] > 1000


def test_missing_source_file_is_a_user_error(bert_inputs, tmp_path):
    from factory.train.data import read_blend

    pack = tmp_path / "pack"
    shutil.copytree(bert_inputs["pack"], pack)
    (pack / "pubmed_train.bin").unlink()
    with pytest.raises(UserError, match="pubmed_train.bin"):
        read_blend(pack)


def test_sized_past_one_epoch(bert_inputs, tmp_path):
    """A run longer than the corpus gets its samples: megatron repeats reshuffled epochs."""
    docs = json.loads((bert_inputs["pack"] / "pack.json").read_text())["sources"]["pubmed"]["docs"]
    d = _build("bert", bert_inputs, tmp_path / "cache", n=docs * 30)
    assert len(d) >= docs * 30
    b = d.batch(docs * 30 - 4, 4)
    assert torch.all(b["attention_mask"].sum(1) > 2)
