"""`factory corpus prepare` end to end: near-duplicates, decontamination, corrupt lines, the
report, and user errors (exit 2 before any work)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus.test_corpus_stage import pubmed_records

REPO = Path(__file__).resolve().parents[2]


def near_copy(text: str, share: float, rng: random.Random) -> str:
    """`text` with `share` of its words substituted by other words of the text."""
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(share * len(words)))):
        words[i] = rng.choice(words) + "x"
    return " ".join(words)


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory.cli", "corpus", "prepare", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_prepare_removes_near_duplicates_and_contamination(tmp_path):
    rng = random.Random(0)
    recs = [r for r in pubmed_records(80, skip=100) if len(r["text"].split()) >= 120][:40]
    copies = [{**recs[i], "id": f"near-{i}", "text": near_copy(recs[i]["text"], 0.02, rng)}
              for i in range(0, 40, 4)]
    test_sentence = recs[7]["text"].split(". ")[1]
    lines = [json.dumps(r) for r in recs[:20] + copies[:5]]
    lines.insert(4, '{"id": 1, "text": "unterminated')
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[20:] + copies[5:])
    # tokenised the way benchmark files are
    (tmp_path / "test.txt").write_text(test_sentence.replace(",", " ,") + "\n")

    r = prepare("--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "*.jsonl.gz"),
                "--output", str(tmp_path / "out"), "--near-dedup",
                "--decontaminate", str(tmp_path / "test.txt"),
                "--report", str(tmp_path / "report.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    kept = {}
    for f in (tmp_path / "out").glob("input*/*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            kept |= {d["id"]: d for d in map(json.loads, fh)}
    # each planted pair keeps one document; the contaminated one is gone; others all stay
    for i in range(0, 40, 4):
        assert (recs[i]["id"] in kept) != (f"near-{i}" in kept) or i == 7
    assert recs[7]["id"] not in kept
    distinct = {r["id"] for i, r in enumerate(recs) if i % 4 and i != 7}
    assert distinct <= set(kept)
    assert rep["removed"]["near_dup"] == 10 and rep["removed"]["decontaminated"] == 1
    assert rep["removed"]["corrupt"] == 1 and "exact_dup" in rep["removed"]
    assert rep["corrupt_lines"] == [{"file": str(tmp_path / "a.jsonl"), "line": 5,
                                     "reason": "corrupt_json"}]
    assert rep["kept"] == len(kept) == 40 + 10 - 10 - 1
    assert [s["name"] for s in rep["steps"]] == ["read", "normalize", "min_words",
                                                 "decontaminate", "exact_dedup", "near_dedup"]
    assert all(s["docs_out"] <= s["docs_in"] for s in rep["steps"])
    some = next(iter(kept.values()))
    assert {"pmid", "journal", "year", "id", "text"} <= set(some)


def test_prepare_missing_input_is_exit_2(tmp_path):
    r = prepare("--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "matches no file" in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()
