"""The manifest fields of the training engine reach the run: parallel layout, wsd decay,
precision; bad layouts are one clear error before any weight is loaded."""

from __future__ import annotations

import pytest

from tests.train.conftest import REPO, pretrain_stage


def _load(*overrides: str):
    from factory import manifest

    return manifest.load(REPO / "domains" / "biomedical.yaml", scale="smoke",
                         overrides=list(overrides))


def test_parallel_section_defaults_and_reaches_the_stage_config():
    assert _load().manifest.parallel.tensor == 1
    stage = pretrain_stage("bert", "parallel.tensor=2")
    assert stage.config.parallel.tensor == 2
    # Part of the cache key: another layout is another config.
    assert stage.config != pretrain_stage("bert").config
    assert stage.check() == []        # smoke BERT: 2 heads


def test_parallel_fields_are_validated():
    from factory.manifest import ManifestError

    with pytest.raises(ManifestError, match="parallel.tensor: must be > 0"):
        _load("parallel.tensor=0")
    with pytest.raises(ManifestError, match="parallel.data.*unknown field"):
        _load("parallel.data=2")


@pytest.mark.parametrize("overrides, message", [
    (("parallel.tensor=4",), "parallel.tensor 4 must divide the 2 attention heads"),
    (("parallel.pipeline=4",), "parallel.pipeline 4 must divide the 2 layers"),
    (("parallel.virtual_pipeline=2",), "parallel.virtual_pipeline 2 needs parallel.pipeline > 1"),
    (("parallel.sequence_parallel=true",), "parallel.sequence_parallel needs parallel.tensor > 1"),
    (("parallel.tensor=2", "parallel.sequence_parallel=true", "training.seq_length=63"),
     "training.seq_length 63 must divide by parallel.tensor 2"),
    (("parallel.pipeline=2", "parallel.virtual_pipeline=2"),
     "parallel.pipeline x virtual_pipeline = 2 x 2 = 4 must divide the 2 layers"),
])
def test_bad_layout_is_reported_by_check(overrides, message):
    problems = pretrain_stage("bert", *overrides).check()
    assert any(message in p for p in problems), problems


def test_pipeline_parallel_must_divide_the_gpt_layers():
    # smoke GPT and BERT: 2 layers.
    assert pretrain_stage("gpt", "parallel.pipeline=2").check() == []
    assert pretrain_stage("bert", "parallel.pipeline=2").check() == []
    problems = pretrain_stage("gpt", "parallel.pipeline=4").check()
    assert any("parallel.pipeline 4 must divide the 2 layers" in p for p in problems), problems


def test_tensor_parallel_must_divide_query_groups():
    # smoke GPT: 4 heads in 2 query groups; TP=4 divides the heads but not the groups.
    problems = pretrain_stage("gpt", "parallel.tensor=4").check()
    assert any("must divide the 2 query groups" in p for p in problems), problems


def test_bad_layout_of_a_continued_base_is_reported_before_loading(tmp_path):
    import json

    from factory.train.stage import PretrainConfig, PretrainStage

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 96, "num_attention_heads": 3,
        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}))
    (base / "model.safetensors").write_bytes(b"not read by check")
    c = pretrain_stage("bert").config
    stage = PretrainStage(PretrainConfig(**{
        **c.model_dump(), "strategy": "continued", "model_dims": None, "base": str(base),
        "parallel": {"tensor": 2}}))
    problems = stage.check()
    assert any("parallel.tensor 2 must divide the 3 attention heads" in p for p in problems)


def test_world_size_not_divisible_by_the_layout_is_a_user_error(tmp_path):
    from factory.stage import MemoryLog, StageContext, UserError

    stage = pretrain_stage("bert", "parallel.tensor=2")     # in a world of one process
    with pytest.raises(UserError, match="= 2 does not divide the world size 1; launch torchrun"):
        stage.run(StageContext(out=tmp_path, inputs={"vocab": tmp_path, "pack": tmp_path},
                               log=MemoryLog()))


def test_wsd_decay_is_selectable_and_shapes_the_schedule():
    stage = pretrain_stage("bert", "training.schedule.decay=wsd",
                           "training.schedule.decay_fraction=0.5",
                           "training.schedule.warmup_fraction=0", "training.steps=20")
    schedule = stage._loop_config().schedule
    assert schedule.decay == "wsd" and schedule.decay_fraction == 0.5
    lrs = [schedule(s) for s in range(1, 21)]
    peak = stage.config.training.lr
    assert lrs[:10] == [peak] * 10                       # stable half
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # decaying half
    assert lrs[-1] == pytest.approx(0.0)


def test_decay_fraction_without_wsd_is_rejected():
    from factory.manifest import ManifestError

    with pytest.raises(ManifestError, match="decay_fraction is for decay: wsd only"):
        _load("training.schedule.decay_fraction=0.3")


def test_precision_auto_is_fp32_on_cpu_and_bf16_is_kept():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU expectation")
    assert pretrain_stage("bert")._loop_config().precision == "fp32"
    assert pretrain_stage("bert", "training.precision=bf16")._loop_config().precision == "bf16"
    from factory.manifest import ManifestError

    with pytest.raises(ManifestError, match="training.precision"):
        _load("training.precision=fp16")


def test_bf16_on_cpu_is_refused_before_any_work(tmp_path):
    import torch

    from factory.stage import MemoryLog, StageContext, UserError

    if torch.cuda.is_available():
        pytest.skip("CPU expectation")
    stage = pretrain_stage("bert", "training.precision=bf16", "parallel.engine=torch")
    with pytest.raises(UserError, match="training.precision bf16: with parallel.engine torch it "
                                        "needs a GPU"):
        stage.run(StageContext(out=tmp_path, inputs={"vocab": tmp_path, "pack": tmp_path},
                               log=MemoryLog()))
    assert not any(tmp_path.iterdir())


def test_dropout_unset_is_0_1_from_scratch_and_the_base_checkpoints_own_when_continued(tmp_path):
    import json

    from factory import manifest
    from factory.train.stage import PretrainStage

    scratch = pretrain_stage("bert").config
    assert (scratch.hidden_dropout, scratch.attention_dropout) == (0.1, 0.1)

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 64, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100,
        "hidden_dropout_prob": 0.05, "attention_probs_dropout_prob": 0.0}))
    (tmp_path / "m.yaml").write_text(
        (REPO / "domains" / "biomedical.yaml").read_text()
        .replace("strategy: scratch", "strategy: continued", 1))
    loaded = manifest.load(tmp_path / "m.yaml", scale="smoke", overrides=[
        f"base.path={base}", "tokenizer=null", "model.size=null"])
    stage = PretrainStage.from_manifest(loaded)
    assert (stage.config.hidden_dropout, stage.config.attention_dropout) == (None, None)
    cfg = stage._model_config(100)
    assert (cfg.hidden_dropout, cfg.attention_dropout) == (0.05, 0.0)     # the base's own

    loaded = manifest.load(tmp_path / "m.yaml", scale="smoke", overrides=[
        f"base.path={base}", "tokenizer=null", "model.size=null", "model.hidden_dropout=0.2"])
    assert PretrainStage.from_manifest(loaded)._model_config(100).hidden_dropout == 0.2
