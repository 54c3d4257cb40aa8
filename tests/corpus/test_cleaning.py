"""Readers (JSON Lines .zst, Parquet, plain text), quality filters per source, and benchmark
decontamination, on real PubMed text and the NCBI-disease test split shipped in the repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.corpus.decontaminate import build_index, iob_sentences, words
from factory.corpus.options import Filters, GopherQuality, Language
from factory.corpus.stage import (
    BenchmarkText,
    CorpusConfig,
    CorpusStage,
    DecontaminateConfig,
    SourceConfig,
)
from tests.corpus.test_corpus_stage import pubmed_records, read_out, run_stage

REPO = Path(__file__).resolve().parents[2]
NCBI = REPO / "domains" / "biomedical" / "ncbi_disease"
MALTESE = ("Il-Maltin huwa l-lingwa nazzjonali ta' Malta u lingwa uffiċjali tal-Unjoni Ewropea. "
           "Hija l-unika lingwa Semitika miktuba bl-alfabet Latin u titkellem minn madwar "
           "nofs miljun persuna fil-gżejjer Maltin u barra minnhom.")


def detokenize(sentence: str) -> str:
    """How a corpus prints a tokenised benchmark sentence: no space before , . ) and after (."""
    for a, b in ((" ,", ","), (" .", "."), (" )", ")"), ("( ", "("), (" ;", ";")):
        sentence = sentence.replace(a, b)
    return sentence


def test_matching_ignores_case_and_punctuation_spacing():
    test = "The APC2 , a homologue of the adenomatous polyposis coli tumour suppressor , is expressed"
    index = build_index([], 13, 8)
    index.add(test, 0)
    corpus = ("Background. the apc2, a homologue of the Adenomatous Polyposis Coli tumour "
              "suppressor, is expressed in brain.")
    assert index.match(corpus) == 0
    assert index.match(corpus.replace("homologue", "homolog")) is None
    assert words("APC2 , a") == words("APC2, a") == ["apc2", "a"]


def test_iob_sentences_join_tokens():
    first = next(iob_sentences(NCBI / "test.tsv"))
    assert first.startswith("Clustering of missense mutations in")
    assert "\t" not in first


def test_stage_readers_filters_and_decontamination(tmp_path):
    import pandas as pd
    import zstandard

    recs = pubmed_records(60)
    tests = [s for s in iob_sentences(NCBI / "test.tsv") if len(s.split()) >= 20]
    d = tmp_path / "in"
    d.mkdir()
    # JSON Lines .zst: 20 abstracts, a Maltese text, an invalid UTF-8 line
    lines = [json.dumps(r).encode() for r in recs[:20]]
    lines.insert(3, json.dumps({"id": "mt-1", "text": MALTESE}).encode())
    lines.insert(7, b'{"id": "bad-utf8", "text": "caf\xe9 \xff"}')
    (d / "en.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    # Parquet: 20 abstracts, two with an NCBI test sentence planted (detokenised)
    pq = [dict(r) for r in recs[20:40]]
    pq[4]["text"] += " " + detokenize(tests[0])
    pq[9]["text"] = detokenize(tests[1]) + " " + pq[9]["text"]
    pd.DataFrame([{"id": r["id"], "text": r["text"], "year": r["year"]} for r in pq]) \
        .to_parquet(d / "pq.parquet")
    # plain text: a document per line; and a document per file
    (d / "lines.txt").write_text("\n\n".join(r["text"].replace("\n", " ") for r in recs[40:50]))
    (d / "files").mkdir()
    for r in recs[50:60]:
        (d / "files" / f"{r['pmid']}.txt").write_text(r["text"])

    gq = GopherQuality(min_doc_words=150)
    cfg = CorpusConfig(
        sources=[
            SourceConfig(name="en", path=str(d / "en.jsonl.zst"),
                         filters=Filters(language=Language(languages=["en"]), gopher_quality=gq)),
            SourceConfig(name="pq", path=str(d / "pq.parquet")),
            SourceConfig(name="lines", path=str(d / "lines.txt"), text_unit="line"),
            SourceConfig(name="files", path=str(d / "files" / "*.txt"))],
        heldout_fraction=0.1, min_words=20,
        decontaminate=DecontaminateConfig(tests=[BenchmarkText(task="ncbi", kind="ner",
                                                         path=str(NCBI))]))
    metrics, _ = run_stage(cfg, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    src = stats["sources"]
    steps = {n: {r["name"]: r for r in s["steps"]} for n, s in src.items()}

    # readers: every format, the bad line noted with its line number
    assert steps["en"]["read"]["docs_in"] == 22 and steps["en"]["read"]["dropped"] == {
        "invalid_utf8": 1}
    assert [(r["line"], r["reason"]) for r in stats["corrupt_lines"]] == [(8, "invalid_utf8")]
    assert steps["pq"]["read"]["docs_out"] == 20
    assert steps["lines"]["read"]["docs_out"] == 10 and steps["files"]["read"]["docs_out"] == 10

    # filters of source "en" only, in order: language first, then Gopher quality
    from datatrove.pipeline.filters import GopherQualityFilter

    from factory.corpus.steps import normalize_text
    assert steps["en"]["filter_language"]["dropped"] == {"wrong_language": 1}
    gopher = GopherQualityFilter(**gq.model_dump())
    from datatrove.data import Document
    expect = sum(1 for r in recs[:20] if gopher.filter(Document(
        text=normalize_text(r["text"]), id="x")) is not True)
    assert expect > 0
    assert sum(steps["en"]["filter_gopher_quality"].get("dropped", {}).values()) == expect
    assert src["en"]["removed"]["filtered:gopher_quality"] == expect
    assert "filter_language" not in steps["pq"]

    # decontamination: both planted documents go, and exactly what the index matches
    index = build_index([("ncbi", "ner", str(NCBI))], 13, 8)
    dirty = {r["id"] for r in pq if index.match(normalize_text(r["text"])) is not None}
    assert {pq[4]["id"], pq[9]["id"]} <= dirty
    assert steps["pq"]["decontaminate"]["dropped"] == {"ncbi": len(dirty)}
    kept = {r["id"] for r in read_out(tmp_path / "out" / "train" / "pq")} | \
        {r["id"] for r in read_out(tmp_path / "out" / "heldout")}
    assert not dirty & kept
    assert metrics["decontaminated"] >= 2
    parquet_kept = read_out(tmp_path / "out" / "train" / "pq")
    assert all(isinstance(r["year"], int) and r["source"] == "pq" for r in parquet_kept)


def test_decontamination_files_are_checked_before_any_work(tmp_path):
    cfg = CorpusConfig(sources=[SourceConfig(name="a", path=str(NCBI / "test.tsv"))],
                       decontaminate=DecontaminateConfig(tests=[
                           BenchmarkText(task="gone", kind="ner", path=str(tmp_path / "nope"))]))
    (problem,) = CorpusStage(cfg).check()
    assert "'gone'" in problem and "test.tsv does not exist" in problem


def test_from_manifest_carries_filters_and_decontamination():
    from factory.manifest import load

    loaded = load(REPO / "domains" / "biomedical.yaml", scale="smoke",
                  overrides=["corpus.filters.language.languages=[en]",
                             "corpus.near_dedup={}"])
    stage = CorpusStage.from_manifest(loaded)
    c = stage.config
    assert c.sources[0].filters.language.languages == ["en"]
    assert c.near_dedup is not None and c.near_dedup.buckets == 20
    (ref,) = c.decontaminate.tests
    assert ref.task == "ncbi_disease" and Path(ref.path) == NCBI
    assert stage.check() == []
    assert "filter_language" in stage.steps(c.sources[0])
    off = load(REPO / "domains" / "biomedical.yaml", scale="smoke",
               overrides=["corpus.decontaminate=null"])
    assert CorpusStage.from_manifest(off).config.decontaminate is None


@pytest.mark.parametrize("bad, msg", [
    ("corpus.executor.kind=slurm", "needs `partition`"),
    ("corpus.sources[0].format=parquet", None),
    ("corpus.filters.gopher_quality.min_doc_wrds=3", "did you mean 'min_doc_words'"),
])
def test_manifest_corpus_fields_validate(bad, msg):
    from factory.manifest import ManifestError, load

    if msg is None:
        assert load(REPO / "domains" / "biomedical.yaml", scale="smoke",
                    overrides=[bad]).manifest.corpus.sources[0].format == "parquet"
        return
    with pytest.raises(ManifestError, match=msg):
        load(REPO / "domains" / "biomedical.yaml", scale="smoke", overrides=[bad])


def test_slurm_executor_gets_the_manifest_settings(tmp_path):
    """Only construction is tested here: no Slurm on this machine."""
    from factory.corpus.execute import _slurm
    from factory.corpus.options import Executor
    from factory.corpus.steps import NormalizeText

    opts = Executor(kind="slurm", partition="cpu", time="02:00:00", cpus_per_task=4,
                    sbatch_args={"account": "lm"})
    ex = _slurm([NormalizeText()], 16, tmp_path / "logs", opts, "clean")
    assert (ex.tasks, ex.partition, ex.time, ex.cpus_per_task) == (16, "cpu", "02:00:00", 4)
    assert ex._sbatch_args["account"] == "lm" and ex.job_name == "factory-clean"


def test_benchmark_suite_test_splits_are_decontaminated():
    """A suite task of the manifest (CaseHOLD, in legal's smoke scale) is read with the
    suite's own loader; a corpus document quoting one of its test questions matches."""
    import json

    from factory.bench.suites import SUITES
    from factory.manifest import load

    loaded = load(REPO / "domains" / "legal.yaml", scale="smoke")
    stage = CorpusStage.from_manifest(loaded)
    refs = [t for t in stage.config.decontaminate.tests if t.kind == "suite"]
    assert [t.task for t in refs] == ["lexglue:CaseHOLD"]
    assert stage.check() == []
    index = build_index([(t.task, t.kind, t.path) for t in refs], ngram=13, min_words=8)
    folder = REPO / "domains" / "legal" / "benchmarks"
    first = SUITES["lexglue"].tasks["CaseHOLD"].load(next(folder.iterdir())).test[0]
    quoted = "As the court held, " + first.context + " We disagree."
    assert index.match(quoted) == 0
    unrelated = json.dumps({"text": "Permission is hereby granted, free of charge, to any "
                                    "person obtaining a copy of this software and associated "
                                    "documentation files"})
    assert index.match(unrelated) is None
