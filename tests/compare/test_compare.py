"""`factory compare` end to end on the tiny biomedical manifest, cut to a few steps."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, needs_minilm

FEW = ["training.steps=3", "training.checkpoint_interval=3", "training.log_interval=1",
       "evaluation.heldout_max_docs=10", "evaluation.tasks[0].max_train_sentences=30",
       "evaluation.tasks[0].max_test_sentences=30", "evaluation.tasks[0].epochs=1"]


@needs_minilm
def test_arm_overrides_keep_the_budget_and_change_the_strategy(tmp_path):
    from factory import base_checkpoint
    from factory.compare import ARMS, arm_overrides
    from factory.manifest import load
    path = REPO / "domains" / "biomedical.yaml"
    loaded = load(path, scale="tiny")
    base = base_checkpoint.resolve(loaded.manifest.base.path, loaded.root)
    arms = {a: load(path, scale="tiny", overrides=arm_overrides(path, "tiny", loaded, base, a))
            .manifest for a in ARMS}
    assert arms["continued_extended"].tokenizer.extend.add > 0
    assert arms["scratch"].strategy == "scratch" and arms["continued"].strategy == "continued"
    assert arms["scratch"].tokenizer.vocab_size == 30522   # the domain vocabulary, base's size
    assert (arms["scratch"].model.num_layers, arms["scratch"].model.hidden_size) == (6, 384)
    budgets = {(m.training.total_steps, m.training.global_batch_size, m.training.seq_length)
               for m in arms.values()}
    assert len(budgets) == 1


@pytest.mark.slow
@needs_minilm
def test_compare_runs_the_arms_and_writes_json_and_report(factory_cli, tmp_path):
    out = tmp_path / "cmp"
    # the manifest's general text (here Maltese) is what every arm's forgetting is scored on
    general = REPO / "domains" / "maltese" / "korpus_malti" / "heldout.jsonl.gz"
    args = [a for s in [*FEW, f"corpus.general_text={general}"] for a in ("--set", s)]
    r = factory_cli("compare", "domains/biomedical.yaml", "--scale", "tiny", "--run-dir", out,
                    "--arms", "scratch,continued_extended,base", *args, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert result["general_text"] == str(general)
    arms = result["arms"]
    assert list(arms) == ["scratch", "continued_extended", "base"]
    for name in ("scratch", "continued_extended"):
        a = arms[name]
        assert a["steps"] == 3 and a["tokens"] == 3 * 32 * 64
        assert a["heldout_unit"] == "nats/word (whole-word masked)"
        assert a["domain_heldout_loss"] > 0 and a["general_heldout_loss"] is not None
        assert 0 <= a["benchmarks"]["ncbi_disease"] <= 100
    assert arms["base"]["steps"] == 0 and arms["base"]["domain_heldout_loss"] is None
    assert "ncbi_disease" in arms["base"]["benchmarks"]
    fertility = {n: a["fertility"]["heldout"]["fertility"] for n, a in arms.items()}
    assert fertility["continued_extended"] < fertility["base"]   # domain words kept whole
    md = (out / "compare.md").read_text()
    assert "| ncbi_disease |" in md and "data:image/png" in (out / "compare.html").read_text()
