"""The megatron engine (megatron-core DDP + megatron's optimizer) trains like the torch engine,
in one process here; under torchrun in test_distributed.py."""

from __future__ import annotations

import contextlib

import pytest


def _bert(seed: int):
    from factory.train.models import ModelConfig, build_model

    import torch

    torch.manual_seed(seed)
    return build_model(ModelConfig(
        family="bert", num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128,
        vocab_size=2048, padded_vocab_size=2048, max_position_embeddings=512,
        hidden_dropout=0.0, attention_dropout=0.0))


def _steps(model, optimizer, ds, engine_name: str, precision: str = "fp32",
           steps: range = range(1, 5)):
    from factory.train import loop
    from factory.train.schedule import LRSchedule

    cfg = loop.LoopConfig(family="bert", total_steps=4, global_batch_size=16,
                          micro_batch_size=4, seq_length=64, clip_grad=1.0,
                          schedule=LRSchedule(lr=2e-3, total_steps=4, warmup_steps=1),
                          weight_decay=0.1, engine=engine_name, precision=precision)
    return [loop.train_step(model, optimizer, ds, cfg, step=s) for s in steps]


def test_megatron_engine_matches_torch_engine(bert_inputs, tmp_path):
    """Same model, same batches (4 micro-batches a step, clipping active, weight decay 0.1):
    megatron's DDP buffers + optimizer give the torch engine's losses, norms and weights; in
    bf16 the parameters are bf16, the fp32 main weights live in the optimizer, and the run
    stays within bf16 noise of fp32."""
    import torch

    from factory.train import data, engine, parallel

    parallel.init(seed=7)
    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    ds = data.build_train_dataset("bert", bert_inputs["pack"], tok, 64, 64, 7, tmp_path)
    settings = dict(lr=2e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, clip_grad=1.0)

    ours, opt = engine.build(_bert(3), engine.EngineConfig(name="torch", **settings))
    reference = _steps(ours, opt, ds, "torch")
    theirs, mopt = engine.build(_bert(3), engine.EngineConfig(
        name="megatron", bucket_size=5000, **settings))       # several buckets
    assert engine.is_megatron(mopt) and not engine.is_megatron(opt)
    got = _steps(theirs, mopt, ds, "megatron")

    assert max(r["grad_norm"] for r in reference) > 1.0       # clipping was active
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in reference], abs=1e-6)
    assert [r["grad_norm"] for r in got] == pytest.approx(
        [r["grad_norm"] for r in reference], rel=1e-5)
    bare = engine.bare(theirs)
    assert type(bare) is type(ours)
    for (name, a), (_, b) in zip(ours.named_parameters(), bare.named_parameters(),
                                 strict=True):
        # Weight decay (0.1 x lr 2e-3 a step) on a bias or norm would move it by ~1e-4.
        assert torch.allclose(a, b, atol=2e-6), name

    half, hopt = engine.build(_bert(3), engine.EngineConfig(
        name="megatron", precision="bf16", **settings))
    bf16 = _steps(half, hopt, ds, "megatron", "bf16")
    assert {p.dtype for p in engine.bare(half).parameters()} == {torch.bfloat16}
    main = [p for g in hopt.param_groups for p in g["params"]]
    assert main and {p.dtype for p in main} == {torch.float32}
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in reference], abs=0.01)
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.05, "bf16 did not learn"


@pytest.mark.parametrize("distributed", [False, True])
def test_bf16_main_weights_start_from_the_loaded_fp32_weights(distributed):
    """A continued run under the megatron engine in bf16: the fp32 main weights the optimizer
    updates start from the checkpoint's fp32 values, not from their bf16 rounding (which is
    what megatron gives a fresh model, and what the bf16 parameters hold)."""
    import torch

    from factory.train import engine, parallel

    parallel.init(seed=7)
    exact = torch.cat([p.detach().flatten() for p in _bert(3).parameters()]).sort().values
    rounded = exact.bfloat16().float().sort().values
    assert not torch.equal(exact, rounded)

    def main_weights(loaded: bool) -> torch.Tensor:
        _, opt = engine.build(_bert(3), engine.EngineConfig(
            name="megatron", precision="bf16", distributed_optimizer=distributed),
            loaded_weights=loaded)
        return torch.cat([p.detach().flatten() for g in opt.param_groups
                          for p in g["params"]]).sort().values

    assert torch.equal(main_weights(loaded=True), exact)
    assert torch.equal(main_weights(loaded=False), rounded)


@pytest.mark.slow  # about 20 s
def test_megatron_engine_bf16_stage_exports(gpt_inputs, tmp_path):
    """The pretrain stage with parallel.engine megatron and precision bf16 runs on CPU (the
    torch engine refuses bf16 there), saves bf16 weights with fp32 main weights in its
    optimizer checkpoint, and the export stage turns the bf16 checkpoint into a HF folder
    whose logits match the megatron model's."""
    import json

    import torch
    from megatron.core import dist_checkpointing

    from factory.stage import MemoryLog, StageContext, UserError
    from factory.train.export import ExportConfig, ExportStage
    from tests.train.conftest import pretrain_stage

    overrides = ("training.steps=6", "training.checkpoint_interval=3", "training.precision=bf16")
    with pytest.raises(UserError, match="parallel.engine megatron"):
        pretrain_stage("gpt", *overrides, "parallel.engine=torch").run(StageContext(
            out=tmp_path / "refused", inputs=gpt_inputs, log=MemoryLog()))
    out = tmp_path / "pretrain"
    out.mkdir()
    log = MemoryLog()
    # parallel.engine auto (the default) picks megatron for bf16 without CUDA.
    metrics = pretrain_stage("gpt", *overrides).run(
        StageContext(out=out, inputs=gpt_inputs, log=log))
    assert metrics["final_loss"] < metrics["first_loss"]
    assert log.param_values["layout.data_parallel"] == 1       # tracked with the run
    assert log.param_values["layout.engine"] == "megatron"
    last = out / "checkpoints" / "iter_0000006"
    extra = torch.load(last / "extra" / "rank00000.pt", weights_only=True)
    assert extra["engine"] == "megatron" and extra["optimizer"] is None
    meta = dist_checkpointing.load_tensors_metadata(str(last / "model"))
    assert {t.dtype for t in meta.values()} == {torch.bfloat16}
    assert json.loads((last / "optimizer" / "metadata.json").read_text())

    export = tmp_path / "export"
    export.mkdir()
    result = ExportStage(ExportConfig(family="gpt")).run(StageContext(
        out=export, inputs={"pretrain": out, "vocab": gpt_inputs["vocab"]}, log=MemoryLog()))
    assert result["step"] == 6 and result["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("name, cuda, dp, precision, saved, expected", [
    ("auto", True, 8, "bf16", None, "megatron"),      # many GPUs: overlapped reduce, ZeRO-1
    ("auto", True, 1, "bf16", None, "torch"),         # one GPU: the engine measured there
    ("auto", False, 2, "fp32", None, "torch"),        # CPU
    ("auto", False, 1, "bf16", None, "megatron"),     # bf16 without CUDA: only megatron can
    ("auto", True, 1, "bf16", "megatron", "megatron"),  # a resumed run keeps its engine
    ("auto", True, 8, "bf16", "torch", "torch"),
    ("torch", True, 8, "bf16", None, "torch"),        # named engines are taken as named
    ("megatron", False, 1, "fp32", "torch", "megatron"),
])
def test_auto_engine_resolution(name, cuda, dp, precision, saved, expected):
    from factory.train import engine

    assert engine.resolve(name, cuda=cuda, data_parallel=dp, precision=precision,
                          saved=saved) == expected


@pytest.mark.slow  # about 15 s
def test_auto_engine_resumes_under_the_checkpoints_engine(bert_inputs, tmp_path):
    """A run written by the megatron engine and resumed with engine auto (which alone would
    pick torch here: CPU, fp32) continues under megatron, to the uninterrupted losses."""
    import json
    import shutil

    from factory.stage import MemoryLog, StageContext
    from tests.train.conftest import pretrain_stage

    settings = ("training.steps=4", "training.checkpoint_interval=2")
    ref = tmp_path / "reference"
    ref.mkdir()
    pretrain_stage("bert", *settings, "parallel.engine=megatron").run(
        StageContext(out=ref, inputs=bert_inputs, log=MemoryLog()))
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    (out / "checkpoints" / "latest.txt").write_text("2\n")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2]))

    log = MemoryLog()
    pretrain_stage("bert", *settings).run(StageContext(out=out, inputs=bert_inputs, log=log))
    assert log.param_values["layout.engine"] == "megatron"
    assert [s for s, _ in log.history if s is not None] == [1, 2, 3, 4]

    def losses(folder):
        return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert losses(out) == pytest.approx(losses(ref), abs=1e-6)


def test_resuming_with_the_other_engine_is_refused(tmp_path):
    """A checkpoint records its engine; resuming it under the other one is one clear error
    before any weight is touched (their optimizer states have different layouts)."""
    import torch

    from factory.stage import UserError
    from factory.train import checkpoint, engine, parallel

    parallel.init(seed=7)
    settings = dict(lr=1e-3, weight_decay=0.01)
    model, opt = engine.build(_bert(1), engine.EngineConfig(name="torch", **settings))
    checkpoint.save(tmp_path, 1, model, opt, consumed_samples=8)
    other, mopt = engine.build(_bert(2), engine.EngineConfig(name="megatron", **settings))
    before = [p.detach().clone() for p in engine.bare(other).parameters()]
    with pytest.raises(UserError, match="written by parallel.engine torch, this run uses "
                                        "megatron"):
        checkpoint.load(tmp_path, 1, other, mopt)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.bare(other).parameters()))


@pytest.mark.slow  # about 20 s
@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_activation_recompute_keeps_the_losses(family, tmp_path, request):
    """training.recompute selective and full (dropout on: its masks must be replayed in the
    recomputation) train to the losses of storing every activation."""
    import json

    from factory.stage import MemoryLog, StageContext
    from tests.train.conftest import pretrain_stage

    inputs = request.getfixturevalue(f"{family}_inputs")
    losses = {}
    for mode in ("none", "selective", "full"):
        out = tmp_path / mode
        out.mkdir()
        stage = pretrain_stage(family, "training.steps=4", "training.checkpoint_interval=4",
                               "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                               f"training.recompute={mode}")
        stage.run(StageContext(out=out, inputs=inputs, log=MemoryLog()))
        losses[mode] = [json.loads(x)["loss"]
                        for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["selective"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["full"] == pytest.approx(losses["none"], abs=1e-6)


@contextlib.contextmanager
def _unpickle_log():
    """The weights_only flag of every torch.load call while open, in order."""
    import torch

    real, flags = torch.load, []

    def spy(*args, **kwargs):
        flags.append(kwargs.get("weights_only") is True)
        return real(*args, **kwargs)

    torch.load = spy
    try:
        yield flags
    finally:
        torch.load = real


@pytest.mark.parametrize("distributed, precision", [(False, "fp32"), (False, "bf16"),
                                                    (True, "bf16")])
def test_megatron_engine_checkpoint_resumes_exactly(bert_inputs, tmp_path, distributed,
                                                    precision):
    """Each of megatron's optimizers (FP32Optimizer, Float16OptimizerWithFloat16Params, the
    distributed one) saved at step 2 and loaded into a differently initialised model continues
    with the uninterrupted run's steps 3-4: main weights, Adam moments and step count come
    back."""
    from factory.train import checkpoint, data, engine, parallel

    parallel.init(seed=7)
    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    ds = data.build_train_dataset("bert", bert_inputs["pack"], tok, 64, 64, 7, tmp_path / "d")
    settings = dict(name="megatron", precision=precision, distributed_optimizer=distributed,
                    lr=2e-3, weight_decay=0.1)
    model, opt = engine.build(_bert(3), engine.EngineConfig(**settings))
    _steps(model, opt, ds, "megatron", precision, range(1, 3))
    checkpoint.save(tmp_path / "ckpt", 2, model, opt, consumed_samples=32)
    later = _steps(model, opt, ds, "megatron", precision, range(3, 5))

    other, other_opt = engine.build(_bert(4), engine.EngineConfig(**settings))
    with _unpickle_log() as loads:
        checkpoint.load(tmp_path / "ckpt", 2, other, other_opt)
    # The checkpoint's objects (each linear's extra state, megatron's optimizer groups) are
    # read by torch's planner unrestricted, but each only after safe_dcp read it as
    # weights_only (factory/train/safe_dcp.py).
    assert False in loads and all(loads[i - 1] for i, w in enumerate(loads) if not w)
    resumed = _steps(other, other_opt, ds, "megatron", precision, range(3, 5))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in later], abs=1e-6)
    assert [r["grad_norm"] for r in resumed] == pytest.approx(
        [r["grad_norm"] for r in later], rel=1e-6)


def test_megatron_engine_step_reads_back_as_few_values_as_the_torch_engine(bert_inputs,
                                                                           tmp_path):
    """One training step (4 micro-batches, clipping) reads as many device values back to the
    host (a GPU sync each) under either engine: the loss and the gradient norm, nothing per
    micro-batch (the data loader finds the masked positions on the host). megatron's
    apex-less grad-norm fallback alone would read one per gradient tensor, its vocab-parallel
    loss two per micro-batch, boolean indexing in the MLM head four, and finding the masked
    positions on the device one."""
    from factory.train import data, engine, parallel
    from factory.train.throughput import host_reads

    parallel.init(seed=7)
    tok = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer")
    ds = data.build_train_dataset("bert", bert_inputs["pack"], tok, 64, 64, 7, tmp_path)
    reads = {}
    for name in ("torch", "megatron"):
        model, opt = engine.build(_bert(3), engine.EngineConfig(name=name, lr=2e-3))
        _steps(model, opt, ds, name, steps=range(1, 2))
        reads[name] = host_reads(lambda: _steps(model, opt, ds, name, steps=range(2, 3)))
    assert reads == {"torch": 2, "megatron": 2}
