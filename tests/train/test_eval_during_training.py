"""training.eval_interval: the held-out loss during pretraining (Megatron-LM's --eval-interval).

It is the token-weighted mean loss over fixed held-out sequences (pack/heldout, and
pack/general_heldout as val_general), the same number as evaluating the checkpoint in one
batch; it lands in metrics.jsonl and the tracker; and it leaves training untouched (same
losses as a run without it). Under data, tensor and
pipeline parallel it equals one process's: tests/train/test_distributed.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.train.conftest import pretrain_stage

STEPS, INTERVAL = 8, 4


def _run(inputs, out, *overrides):
    from factory.stage import MemoryLog, StageContext
    from factory.train import loop

    out.mkdir()
    log = MemoryLog()
    stage = pretrain_stage("bert", f"training.steps={STEPS}",
                           f"training.checkpoint_interval={INTERVAL}", *overrides)
    headline = stage.run(StageContext(out=out, inputs=inputs, log=log))
    return stage, headline, log, loop.read_metrics(out / "metrics.jsonl")


def test_held_out_loss_is_logged_and_leaves_training_alone(bert_inputs, tmp_path):
    from factory.train import data, parallel
    from factory.train.bert import masked_positions
    from factory.train.export import load_checkpoint_model

    _, _, _, plain = _run(bert_inputs, tmp_path / "plain")
    # A pack whose general-English split is a copy of its domain split: the two evaluations
    # must then agree exactly (the general one is the same code on another prefix).
    pack = tmp_path / "pack"
    shutil.copytree(bert_inputs["pack"], pack)
    for ext in (".bin", ".idx"):
        shutil.copy(pack / f"heldout{ext}", pack / f"general_heldout{ext}")
    meta = json.loads((pack / "pack.json").read_text())
    meta["general_heldout"] = {**meta["heldout"], "prefix": "general_heldout"}
    (pack / "pack.json").write_text(json.dumps(meta))
    stage, headline, log, rows = _run({**bert_inputs, "pack": pack}, tmp_path / "eval",
                                      f"training.eval_interval={INTERVAL}",
                                      "training.eval_samples=20")
    # Dropout is on: evaluating must not draw from any generator training uses.
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_general_loss"] == r["val_loss"]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert headline["final_val_loss"] == headline["final_val_general_loss"] == \
        evals[1]["val_loss"]
    tracked = {s: v["val_loss"] for s, v in log.history if s is not None and "val_loss" in v}
    assert tracked == {r["step"]: r["val_loss"] for r in evals}

    # The number itself: the final checkpoint over the same held-out samples in one batch
    # (20 rounded up to whole global batches of 16: 32, in 4 micro-batches while training).
    t = stage.config.training
    assert t.global_batch_size == 16 and t.micro_batch_size == 8
    parallel.init()
    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    held = data.build_heldout_dataset("bert", bert_inputs["pack"], tok, t.seq_length, 32,
                                      t.seed, tmp_path / "cache",
                                      mask_prob=stage.config.mask_prob or 0.15)
    b = held.batch(0, 32)
    model = load_checkpoint_model(tmp_path / "eval").eval()
    with torch.no_grad():
        per_token = model(b["tokens"], b["attention_mask"], tokentype_ids=b["types"],
                          lm_labels=b["labels"], loss_mask=b["loss_mask"],
                          masked_positions=masked_positions(b["loss_mask"]))
    expected = float((per_token * b["loss_mask"]).sum() / b["loss_mask"].sum())
    assert evals[1]["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_a_pack_without_held_out_split_is_a_clear_error(bert_inputs, tmp_path):
    from factory.stage import UserError
    from factory.train import data

    pack = tmp_path / "pack"
    shutil.copytree(bert_inputs["pack"], pack)
    meta = json.loads((pack / "pack.json").read_text())
    del meta["heldout"]
    (pack / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"pack\.json: no heldout split.*eval_interval: null"):
        data.build_heldout_dataset("bert", pack, None, 64, 16, 1, tmp_path / "cache")
