"""MinHash near-dedup in the corpus stage: copies with 2% of words edited go, held-out text
always wins its cluster (no near-copy of it stays in training), distinct documents stay."""

from __future__ import annotations

import json
import random

import pytest

from factory.corpus.options import NearDedup
from factory.corpus.stage import CorpusConfig, SourceConfig
from tests.corpus.test_corpus_stage import (
    pubmed_records,
    read_out,
    run_stage,
    write_jsonl,
)
from tests.corpus.test_prepare_cli import near_copy


@pytest.mark.slow
def test_near_copies_go_and_heldout_wins(tmp_path):
    rng = random.Random(1)
    recs = [r for r in pubmed_records(90, skip=200) if len(r["text"].split()) >= 120][:40]
    train = recs[:30] + [{**recs[i], "id": f"near-{i}", "text": near_copy(recs[i]["text"], 0.02,
                                                                          rng)}
                         for i in range(0, 30, 3)]
    # held-out: 5 distinct documents, and near-copies of 5 training documents
    held = recs[30:35] + [{**recs[i], "id": f"held-{i}", "text": near_copy(recs[i]["text"], 0.02,
                                                                           rng)}
                          for i in (1, 4, 7, 10, 13)]
    tf = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in train])
    hf = write_jsonl(tmp_path / "held.jsonl", [json.dumps(r) for r in held])
    cfg = CorpusConfig(sources=[SourceConfig(name="pm", path=str(tf))],
                       heldout=SourceConfig(name="heldout", path=str(hf)),
                       near_dedup=NearDedup(), min_words=20)
    run_stage(cfg, tmp_path / "out")
    kept_train = {r["id"] for r in read_out(tmp_path / "out" / "train" / "pm")}
    kept_held = {r["id"] for r in read_out(tmp_path / "out" / "heldout")}
    assert kept_held == {r["id"] for r in held}
    for i in (1, 4, 7, 10, 13):
        assert recs[i]["id"] not in kept_train           # its near-copy is held out
    for i in range(0, 30, 3):
        assert (recs[i]["id"] in kept_train) != (f"near-{i}" in kept_train)
    others = {recs[i]["id"] for i in range(30) if i % 3 and i not in (1, 4, 7, 10, 13)}
    assert others <= kept_train
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    nd = {r["name"]: r for r in stats["sources"]["pm"]["steps"]}["near_dedup"]
    assert nd["dropped"] == {"near_duplicate": 10 + 5}
