"""training.compile: compiled transformer layers compute what eager ones do, keep the model's
parameter names, fuse a whole layer into one graph shared by all layers (the GPU path: SDPA
attention, tensor parallel 1), and resume exactly with dropout on."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from tests.train.conftest import pretrain_stage
from tests.train.test_models import BERT, GPT, _batch


def _can_compile() -> bool:
    from factory.stage import UserError
    from factory.train.compiled import check_available

    try:
        check_available()
    except UserError:
        return False
    return True


needs_compiler = pytest.mark.skipif(
    not _can_compile(), reason="training.compile on CPU needs a C++ compiler and Python.h")


@pytest.fixture(scope="module")
def megatron():
    from factory.train import parallel

    parallel.init()


def _loss(model, cfg, ids, mask):
    if cfg.family == "gpt":
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=ids).mean()
    from factory.train.bert import masked_positions

    picked = (torch.arange(ids.numel()).view_as(ids) % 5 == 0).float() * mask
    per_token = model(ids, mask, lm_labels=ids, loss_mask=picked,
                      masked_positions=masked_positions(picked))
    return (per_token * picked).sum() / picked.sum()


@needs_compiler
@pytest.mark.parametrize("cfg", [BERT, GPT], ids=["bert", "gpt"])
def test_compiled_layers_equal_eager_in_one_graph(megatron, monkeypatch, cfg):
    from torch._dynamo.utils import counters

    from factory.train.compiled import compile_layers
    from factory.train.models import build_model

    monkeypatch.setenv("FACTORY_ATTENTION", "sdpa")
    cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    names = list(model.state_dict())
    ids, mask = _batch()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = _loss(model, cfg, ids, mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model) == cfg.num_layers
    loss, grads = loss_and_grads()

    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert list(model.state_dict()) == names, "compiling renamed parameters"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, "each layer compiled a graph of its own"


def test_no_compiler_or_headers_on_cpu_is_a_clear_error(monkeypatch, tmp_path):
    from factory.stage import UserError
    from factory.train import compiled

    if torch.cuda.is_available():
        pytest.skip("on a GPU torch.compile needs no C++ compiler")
    monkeypatch.delenv("CXX", raising=False)
    with monkeypatch.context() as m:
        m.setattr(compiled.shutil, "which", lambda name: None)
        with pytest.raises(UserError,
                           match=r"training.compile.*g\+\+ or clang\+\+.*compile: false"):
            compiled.check_available()
    monkeypatch.setattr(compiled.sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(UserError, match="training.compile.*Python.h not found.*python3-dev"):
        compiled.check_available()


@needs_compiler
@pytest.mark.slow
def test_compiled_stage_resumes_exactly(bert_inputs, tmp_path, monkeypatch):
    """The real stage with compile on and dropout on: a rerun from the step-4 checkpoint
    repeats the uninterrupted run's losses (the compiled dropout draws from the restored
    generator)."""
    from torch._dynamo.utils import counters

    from factory.stage import StageContext
    from factory.train import checkpoint, loop

    counters.clear()
    monkeypatch.setenv("FACTORY_ATTENTION", "sdpa")
    stage = pretrain_stage("bert", "training.steps=8", "training.checkpoint_interval=4",
                           "training.compile=true")
    assert stage.config.training.compile
    first = tmp_path / "first"
    first.mkdir()
    stage.run(StageContext(out=first, inputs=bert_inputs))
    rows = loop.read_metrics(first / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert counters["stats"]["unique_graphs"] >= 1, "the stage ran its layers uncompiled"

    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(checkpoint.iter_dir(second / "checkpoints", 8))
    (second / "checkpoints" / checkpoint.LATEST).write_text("4\n")
    stage.run(StageContext(out=second, inputs=bert_inputs))
    again = loop.read_metrics(second / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(1, 9))
    for a, b in zip(rows[4:], again[4:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), f"step {a['step']}"
