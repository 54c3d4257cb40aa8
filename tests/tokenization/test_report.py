"""The report's measures on hand-checkable text, its input reader, table and plot."""

from __future__ import annotations

import gzip
import json

import pytest

from factory.stage import UserError
from tokenization.fertility import coverage, fertility_report, top_words
from tokenization.io import read_texts
from tokenization.report import compare, markdown_table, write_report

from tests.tokenization.test_fertility import hand_wordpiece


def test_top_words_strip_punctuation_and_skip_numbers():
    texts = ["The cat, the cat.", "(cat) dogs 2020 2020 2020 -- the"]
    assert top_words(texts, n=3) == ["cat", "the", "The"]      # 3x cat, 2x the, 1x The
    assert "2020" not in top_words(texts) and "--" not in top_words(texts)


def test_coverage_counts_words_kept_whole():
    tok = hand_wordpiece()
    # cat: 1 piece, dogs: dog ##s, unhappiness: 3 pieces, The: lowercased to one piece
    assert coverage(tok, ["cat", "dogs", "unhappiness", "The"]) == pytest.approx(2 / 4)
    assert coverage(tok, []) == 0.0
    r = fertility_report(tok, ["the cat sat.", "dogs"], top=["cat", "dogs"])
    assert r["coverage_top1000"] == pytest.approx(0.5)


def test_read_texts_formats_and_errors(tmp_path):
    jl = tmp_path / "a.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "x"}) + "\n"
                + json.dumps({"text": "two"}) + "\n")
    assert list(read_texts(jl)) == ["one", "two"]
    txt = tmp_path / "b.txt"
    txt.write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    assert list(read_texts(txt)) == ["first line", "second line"]
    bad = tmp_path / "c.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_texts(bad))
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl:2: not a JSON object"):
        list(read_texts(broken))
    with pytest.raises(UserError, match="no such input file"):
        list(read_texts(tmp_path / "missing.txt"))


def test_compare_table_and_plot(tmp_path):
    tok = hand_wordpiece()
    texts = ["the cat sat.", "unhappiness dogs"]
    results = compare({"hand": tok, "again": tok}, {"set": texts})
    assert results["set"]["hand"] == results["set"]["again"]
    assert results["set"]["hand"]["fertility"] == pytest.approx(
        fertility_report(tok, texts)["fertility"])
    table = markdown_table(results)
    assert table.count("\n") == 4 and "| set | hand | 5 | 1.800 |" in table
    files = write_report(results, tmp_path, title="hand")
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["json"].read_text()) == results
