"""The pack stage: real text -> megatron-core indexed datasets, checked by decoding them back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from factory.corpus.pack import PackConfig, PackSource, PackStage, split_sentences, token_dtype
from factory.stage import MemoryLog, StageContext, UserError
from factory.vocab import GENERAL_TEXT
from tokenization.io import iter_texts
from tokenization.train import save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed"


def lines(src: Path, n: int, skip: int = 0) -> list[str]:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        return [line for i, line in zip(range(skip + n), f) if i >= skip]


def corpus_folder(root: Path, sources: dict[str, tuple[int, int]], n_held: int) -> Path:
    """corpus/ per the contract: train/<name>/00000.jsonl.gz (docs skip..skip+n), heldout/."""
    docs = {}
    for name, (skip, n) in sources.items():
        (root / "train" / name).mkdir(parents=True)
        docs[name] = lines(PUBMED / "train.jsonl.gz", n, skip)
        with gzip.open(root / "train" / name / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(docs[name])
    (root / "heldout").mkdir()
    with gzip.open(root / "heldout" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines(PUBMED / "heldout.jsonl.gz", n_held))
    (root / "stats.json").write_text(json.dumps(
        {"sources": {k: {"docs": len(v)} for k, v in docs.items()}, "heldout": {"docs": n_held}}))
    return root


def vocab_folder(root: Path, kind: str, corpus: Path) -> Path:
    casing = "uncased" if kind == "wordpiece" else "cased"
    tok = train_tokenizer(kind, 1500, casing, 2, iter_texts(sorted(corpus.rglob("*.jsonl.gz"))))
    save_tokenizer(tok, kind, root / "tokenizer")
    return root


def run_pack(tmp_path: Path, family: str, kind: str, sources: dict[str, tuple[int, int]],
             weights: dict[str, float], general: Path = GENERAL_TEXT):
    corpus = corpus_folder(tmp_path / "corpus", sources, n_held=15)
    vocab = vocab_folder(tmp_path / "vocab", kind, corpus)
    out = tmp_path / "pack"
    out.mkdir()
    stage = PackStage(PackConfig(family=family, sources=[
        PackSource(name=n, weight=w) for n, w in weights.items()], general_text=str(general)))
    log = MemoryLog()
    metrics = stage.run(StageContext(out=out, inputs={"corpus": corpus, "vocab": vocab}, log=log))
    return corpus, vocab, out, metrics


def read_docs(prefix: Path) -> list[list[np.ndarray]]:
    """Each document of an IndexedDataset as its list of sequences."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    di = ds.document_indices
    # copies: the arrays are views on a memory map closed with `ds`
    return [[np.array(ds[j]) for j in range(di[i], di[i + 1])] for i in range(len(di) - 1)]


def test_bert_pack_round_trip_two_sources(tmp_path):
    from tokenizers import Tokenizer

    corpus, vocab, out, metrics = run_pack(
        tmp_path, "bert", "wordpiece", {"abstracts": (0, 40), "more": (40, 25)},
        {"abstracts": 3.0, "more": 1.0})
    tok = Tokenizer.from_file(str(vocab / "tokenizer" / "tokenizer.json"))
    meta = json.loads((out / "pack.json").read_text())
    assert (meta["family"], meta["dtype"], meta["vocab_size"], meta["eod_id"]) == (
        "bert", "uint16", tok.get_vocab_size(), tok.token_to_id("[SEP]"))

    counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for name, n_docs in (("abstracts", 40), ("more", 25)):
        entry = meta["sources"][name]
        assert entry["prefix"] == f"{name}_train" and entry["docs"] == n_docs
        assert entry["weight"] == {"abstracts": 3.0, "more": 1.0}[name]
        texts = list(iter_texts([corpus / "train" / name / "00000.jsonl.gz"]))
        docs = read_docs(out / entry["prefix"])
        assert len(docs) == n_docs
        for text, seqs in zip(texts, docs):
            assert seqs[0].dtype == np.uint16
            # one sequence per sentence, each the tokenizer's encoding of that sentence ...
            sents = split_sentences(text)
            assert len(seqs) == len(sents) > 1
            assert [s.tolist() for s in seqs] == [tok.encode(s, add_special_tokens=False).ids
                                                 for s in sents]
            # ... and together exactly the encoding of the whole document (no text lost)
            assert np.concatenate(seqs).tolist() == tok.encode(text, add_special_tokens=False).ids
            counts += np.bincount(np.concatenate(seqs), minlength=counts.size)
        assert entry["tokens"] == sum(sum(len(s) for s in d) for d in docs)
        assert metrics[f"{name}.tokens"] == entry["tokens"]
    assert (np.load(out / "unigram_counts.npy", allow_pickle=False) == counts).all()
    assert metrics["train_tokens"] == counts.sum()

    held = read_docs(out / "heldout")
    assert meta["heldout"]["prefix"] == "heldout" and len(held) == meta["heldout"]["docs"] == 15
    assert metrics["heldout_tokens"] == meta["heldout"]["tokens"] == sum(
        sum(len(s) for s in d) for d in held)
    # General English (the shipped domains/general sample), for the forgetting curve.
    general = read_docs(out / "general_heldout")
    texts = list(iter_texts([GENERAL_TEXT]))
    assert meta["general_heldout"]["prefix"] == "general_heldout"
    assert len(general) == meta["general_heldout"]["docs"] == len(texts) > 10
    assert np.concatenate(general[0]).tolist() == tok.encode(texts[0],
                                                             add_special_tokens=False).ids
    assert metrics["general_heldout_tokens"] == meta["general_heldout"]["tokens"]


def test_gpt_pack_appends_eod_and_feeds_megatron_gpt_dataset(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from tokenization.megatron import MegatronTokenizer

    corpus, vocab, out, metrics = run_pack(tmp_path, "gpt", "byte_bpe", {"web": (0, 30)},
                                           {"web": 1.0})
    mt = MegatronTokenizer(vocab / "tokenizer")
    meta = json.loads((out / "pack.json").read_text())
    assert meta["eod_id"] == mt.eod == mt.vocab["<|endoftext|>"]
    texts = list(iter_texts([corpus / "train" / "web" / "00000.jsonl.gz"]))
    docs = read_docs(out / "web_train")
    assert len(docs) == len(texts) == 30
    for text, seqs in zip(texts, docs):
        assert len(seqs) == 1
        assert seqs[0].tolist() == mt.tokenize(text) + [mt.eod]
        assert mt.detokenize(seqs[0][:-1].tolist()) == text      # byte-level: exact text back

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([str(out / "web_train")], None),
                           split="100,0,0", tokenizer=mt, reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
                           mmap_bin_files=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True,
                                                cfg).build()
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert int(sample["tokens"].max()) < mt.vocab_size


def test_general_text_of_the_manifest_is_packed_in_place_of_english(tmp_path):
    from tokenizers import Tokenizer

    maltese = tmp_path / "maltese.jsonl.gz"
    maltese.write_bytes(gzip.compress("".join(lines(
        REPO / "domains" / "maltese" / "korpus_malti" / "heldout.jsonl.gz", 12)).encode()))
    _, vocab, out, _ = run_pack(tmp_path, "bert", "wordpiece", {"pm": (0, 20)}, {"pm": 1.0},
                                general=maltese)
    tok = Tokenizer.from_file(str(vocab / "tokenizer" / "tokenizer.json"))
    texts = list(iter_texts([maltese]))
    general = read_docs(out / "general_heldout")
    assert len(general) == len(texts) == 12
    assert [np.concatenate(d).tolist() for d in general] == [
        tok.encode(t, add_special_tokens=False).ids for t in texts]


def test_missing_source_folder_is_a_user_error(tmp_path):
    corpus = corpus_folder(tmp_path / "corpus", {"a": (0, 5)}, n_held=3)
    vocab = vocab_folder(tmp_path / "vocab", "wordpiece", corpus)
    stage = PackStage(PackConfig(family="bert", sources=[PackSource(name="b", weight=1.0)]))
    (tmp_path / "pack").mkdir()
    with pytest.raises(UserError, match="train/b"):
        stage.run(StageContext(out=tmp_path / "pack", inputs={"corpus": corpus, "vocab": vocab}))


def test_dtype_follows_vocab_size():
    assert token_dtype(30522) is np.uint16 and token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.int32 and token_dtype(128256) is np.int32


def test_sentence_rule():
    text = ('Aspirin in MI.\nPatients (n=5) improved. 5 patients died! "Quoted." Then: e.g. '
            'a case. lower starts stay.')
    assert split_sentences(text) == ["Aspirin in MI.", "Patients (n=5) improved.",
                                     "5 patients died!", '"Quoted."',
                                     "Then: e.g. a case. lower starts stay."]


def test_worker_processes_write_the_same_bytes(tmp_path):
    corpus = corpus_folder(tmp_path / "corpus", {"pm": (0, 40)}, n_held=5)
    vocab = vocab_folder(tmp_path / "vocab", "wordpiece", corpus)
    out = {}
    for w in (1, 2):
        out[w] = tmp_path / f"pack{w}"
        out[w].mkdir()
        PackStage(PackConfig(family="bert", sources=[PackSource(name="pm", weight=1.0)],
                             workers=w)).run(
            StageContext(out=out[w], inputs={"corpus": corpus, "vocab": vocab}))
    for name in ("pm_train.bin", "pm_train.idx", "heldout.bin", "unigram_counts.npy"):
        assert (out[1] / name).read_bytes() == (out[2] / name).read_bytes(), name
