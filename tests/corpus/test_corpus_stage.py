"""The corpus stage on small real PubMed files with planted duplicates, short and bad lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from factory.corpus.stage import CorpusConfig, CorpusStage, HFDataset, SourceConfig
from factory.corpus.steps import heldout_score, normalize_text
from factory.stage import MemoryLog, StageContext, UserError

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed" / "train.jsonl.gz"


def pubmed_records(n: int, skip: int = 0) -> list[dict]:
    out = []
    with gzip.open(PUBMED, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if i < skip or len(rec["text"].split()) < 40:
                continue
            out.append(rec)
            if len(out) == n:
                break
    return out


def write_jsonl(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def planted(tmp_path):
    """Two files of one source (a glob): 30 real abstracts, 2 planted duplicates (one only
    differs in whitespace and line endings, and sits in the other file), 2 short documents,
    1 corrupt JSON line and 1 record without `text`."""
    recs = pubmed_records(30)
    d = tmp_path / "data"
    d.mkdir()
    first = [json.dumps(r) for r in recs[:20]]
    first.insert(5, json.dumps({**recs[3], "id": "dup-1"}))                    # exact copy
    first.insert(9, '{"id": "broken", "text": "unterminated')                   # bad JSON
    first.append(json.dumps({"id": "short-1", "text": "Too short to keep."}))
    second = [json.dumps(r) for r in recs[20:]]
    messy = recs[12]["text"].replace(" ", "  \t ").replace("\n", "\r\n")
    second.append(json.dumps({**recs[12], "id": "dup-2", "text": messy}))       # same once normalised
    second.append(json.dumps({"id": "no-text", "abstract": "wrong field"}))
    second.append(json.dumps({"id": "short-2", "text": "Also short."}))
    write_jsonl(d / "part1.jsonl.gz", first)
    write_jsonl(d / "part2.jsonl", second)
    return recs, d


def run_stage(cfg: CorpusConfig, out: Path):
    stage = CorpusStage(cfg)
    assert stage.check() == []
    out.mkdir(parents=True, exist_ok=True)
    log = MemoryLog()
    metrics = stage.run(StageContext(out=out, inputs={}, log=log))
    return metrics, log


def read_out(folder: Path) -> list[dict]:
    recs = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            recs += [json.loads(line) for line in fh]
    return recs


def test_counts_dedup_split_and_fields(planted, tmp_path):
    recs, d = planted
    cfg = CorpusConfig(sources=[SourceConfig(name="pubmed", path=str(d / "part*.jsonl*"))],
                       heldout_fraction=0.2, min_words=20)
    metrics, log = run_stage(cfg, tmp_path / "out")
    out = tmp_path / "out"

    stats = json.loads((out / "stats.json").read_text())
    steps = {s["name"]: s for s in stats["sources"]["pubmed"]["steps"]}
    assert steps["read"] == {"name": "read", "docs_in": 36, "docs_out": 34,
                             "words_out": steps["read"]["words_out"],
                             "dropped": {"corrupt_json": 1, "missing_text": 1}}
    assert steps["heldout_split"]["words_in"] == steps["exact_dedup"]["words_out"] > 0
    assert stats["sources"]["pubmed"]["removed"] == {
        "corrupt": 2, "filtered:normalize": 0, "filtered:min_words": 2, "exact_dup": 2}
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in stats["corrupt_lines"]] == [
        ("part1.jsonl.gz", 10, "corrupt_json"), ("part2.jsonl", 12, "missing_text")]
    assert (steps["normalize"]["docs_in"], steps["normalize"]["docs_out"]) == (34, 34)
    assert steps["min_words"]["dropped"] == {"too_few_words": 2}
    assert (steps["exact_dedup"]["docs_in"], steps["exact_dedup"]["docs_out"]) == (32, 30)

    train, held = read_out(out / "train" / "pubmed"), read_out(out / "heldout")
    kept = {r["id"] for r in train + held}
    # the 30 distinct abstracts, each once (of a duplicate pair either copy may survive) ...
    assert len(kept) == len(train) + len(held) == 30
    assert recs[3]["id"] in kept and "dup-1" not in kept      # same file: the first copy
    assert len(kept & {recs[12]["id"], "dup-2"}) == 1
    assert kept - {recs[12]["id"], "dup-2"} == {r["id"] for r in recs} - {recs[12]["id"]}
    # ... split by sha256(seed:id) < fraction
    expect_held = {i for i in kept if heldout_score(0, i) < 0.2}
    assert {r["id"] for r in held} == expect_held and 0 < len(expect_held) < 30
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert stats["sources"]["pubmed"]["docs"] == len(train)
    assert stats["sources"]["pubmed"]["words"] == sum(len(r["text"].split()) for r in train)
    assert stats["heldout"]["docs"] == len(held)

    by_id = {r["id"]: r for r in recs} | {"dup-2": recs[12]}
    for r in train + held:
        orig = by_id[r["id"]]
        assert r["source"] == "pubmed"
        assert (r["pmid"], r["journal"], r["year"]) == (orig["pmid"], orig["journal"], orig["year"])
        assert r["text"] == normalize_text(orig["text"])
        assert "factory_out" not in r and "duplicate_count" not in r

    assert metrics["pubmed.docs_kept"] == metrics["docs_kept"] == len(train)
    assert metrics["heldout_docs"] == len(held)
    assert metrics["duplicates"] == 2 and metrics["corrupt_lines"] == 2
    assert metrics["words_kept"] == stats["sources"]["pubmed"]["words"]
    assert (out / "stats.json", None) in log.artifacts
    assert not (out / ".work").exists()


def test_explicit_heldout_is_cleaned_and_wins_over_train_copies(tmp_path):
    recs = pubmed_records(12)
    train_f = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in recs[:10]])
    held_recs = [recs[2], recs[10], recs[11], {"id": "h-short", "text": "tiny"}]
    held_f = write_jsonl(tmp_path / "held.jsonl.gz", [json.dumps(r) for r in held_recs])
    cfg = CorpusConfig(sources=[SourceConfig(name="pm", path=str(train_f))],
                       heldout=SourceConfig(name="heldout", path=str(held_f)), min_words=20)
    metrics, _ = run_stage(cfg, tmp_path / "out")
    train, held = read_out(tmp_path / "out" / "train" / "pm"), read_out(tmp_path / "out" / "heldout")
    assert {r["id"] for r in held} == {recs[2]["id"], recs[10]["id"], recs[11]["id"]}
    # recs[2] is in both inputs: held out, so dropped from training (no leak)
    assert {r["id"] for r in train} == {r["id"] for i, r in enumerate(recs[:10]) if i != 2}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["heldout"]["docs"] == 3 and stats["sources"]["pm"]["heldout_docs"] == 0
    assert {s["name"]: s for s in stats["heldout"]["steps"]}["min_words"]["docs_out"] == 3
    assert metrics["pm.duplicates"] == 1


def test_dedup_can_be_switched_off(tmp_path):
    recs = pubmed_records(6)
    f = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in recs]
                    + [json.dumps({**recs[0], "id": "copy"})])
    cfg = CorpusConfig(sources=[SourceConfig(name="a", path=str(f))], heldout_fraction=0.01,
                       exact_dedup=False)
    with pytest.raises(UserError, match="no held-out document"):   # 1% of 7 documents
        CorpusStage(cfg).run(StageContext(out=tmp_path / "x", inputs={}))
    cfg = cfg.model_copy(update={"heldout_fraction": 0.3})
    metrics, _ = run_stage(cfg, tmp_path / "o")
    assert metrics["docs_kept"] + metrics["heldout_docs"] == 7
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert [s["name"] for s in stats["sources"]["a"]["steps"]] == [
        "read", "normalize", "min_words", "heldout_split"]


def test_check_names_the_source_and_path(tmp_path):
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    stage = CorpusStage(CorpusConfig(sources=[
        SourceConfig(name="missing", path=str(tmp_path / "nothing" / "*.jsonl.gz")),
        SourceConfig(name="broken", path=str(bad_gz))]))
    problems = stage.check()
    assert len(problems) == 2
    assert "(missing)" in problems[0] and "matches no file" in problems[0]
    assert "(broken)" in problems[1] and str(bad_gz) in problems[1]


def test_offline_hub_dataset_fails_in_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stage = CorpusStage(CorpusConfig(sources=[
        SourceConfig(name="web", hf_dataset=HFDataset(id="someone/some-corpus"))]))
    (problem,) = stage.check()
    assert "(web)" in problem and "someone/some-corpus" in problem and "local folder" in problem


def test_fingerprint_follows_every_byte(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in pubmed_records(3)])
    stage = CorpusStage(CorpusConfig(sources=[SourceConfig(name="a", path=str(f))]))
    before = stage.fingerprint()
    data = bytearray(f.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    f.write_bytes(bytes(data))
    assert stage.fingerprint() != before


def test_a_source_emptied_by_a_filter_is_a_user_error(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in pubmed_records(5)])
    stage = CorpusStage(CorpusConfig(sources=[SourceConfig(name="tiny", path=str(f))],
                                     min_words=100000))
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"'tiny'.*min_words=100000"):
        stage.run(StageContext(out=tmp_path / "out", inputs={}))


def test_a_truncated_gzip_keeps_what_was_read(tmp_path):
    recs = pubmed_records(40)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode())
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(data[: len(data) // 2])
    metrics, _ = run_stage(CorpusConfig(sources=[SourceConfig(name="cut", path=str(f))],
                                        heldout_fraction=0.1), tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    read = stats["sources"]["cut"]["steps"][0]
    assert read["truncated_files"] == 1 and 0 < read["docs_out"] < 40
    assert metrics["docs_kept"] + metrics["heldout_docs"] == read["docs_out"]


def test_hf_dataset_source_from_a_local_folder(tmp_path):
    """The datatrove HuggingFaceDatasetReader path (streaming), offline on a local folder."""
    recs = pubmed_records(8)
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [json.dumps({**r, "body": r.pop("text")}) for r in recs])
    cfg = CorpusConfig(sources=[SourceConfig(name="hf", text_field="body",
                                             hf_dataset=HFDataset(id=str(folder)))],
                       heldout_fraction=0.25, min_words=20)
    metrics, _ = run_stage(cfg, tmp_path / "out")
    kept = read_out(tmp_path / "out" / "train" / "hf") + read_out(tmp_path / "out" / "heldout")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in recs)
    assert all("body" not in r and r["text"] for r in kept)
    assert metrics["docs_kept"] + metrics["heldout_docs"] == 8


def test_from_manifest_resolves_the_demo_paths():
    from factory.manifest import load

    stage = CorpusStage.from_manifest(load(REPO / "domains" / "biomedical.yaml", scale="tiny"))
    c = stage.config
    assert c.sources[0].name == "pubmed" and Path(c.sources[0].path) == PUBMED
    assert c.heldout is not None and c.min_words == 20
    assert stage.check() == []
