from pathlib import Path

import pytest

from factory import manifest as mf
from tests.conftest import REPO

DOMAINS = sorted((REPO / "domains").glob("*.yaml"))

MINIMAL = """\
name: demo
family: bert
model: {size: smoke}
tokenizer: {kind: wordpiece, vocab_size: 1000}
corpus:
  sources:
    - name: a
      path: a.jsonl.gz
training:
  seq_length: 32
  global_batch_size: 8
  micro_batch_size: 4
  steps: 10
  lr: 1.0e-3
  checkpoint_interval: 5
scales:
  small:
    training: {steps: 2, seq_length: 16}
    corpus:
      sources:
        - {name: b, path: b.jsonl.gz}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", DOMAINS, ids=[p.name for p in DOMAINS])
def test_every_domain_manifest_validates_at_every_scale(path):
    for scale in [None, *mf.scales_of(path)]:
        loaded = mf.load(path, scale=scale)
        assert loaded.manifest.training.total_steps > 0


def test_scale_merges_mappings_and_replaces_lists(tmp_path):
    loaded = mf.load(write(tmp_path, MINIMAL), scale="small")
    t = loaded.manifest.training
    assert (t.steps, t.seq_length, t.global_batch_size) == (2, 16, 8)  # merged, rest kept
    assert [s.name for s in loaded.manifest.corpus.sources] == ["b"]   # list replaced


def test_set_overrides_apply_before_validation_and_are_recorded(tmp_path):
    loaded = mf.load(write(tmp_path, MINIMAL), overrides=["training.lr=3e-4",
                                                          "corpus.sources[0].weight=2"])
    assert loaded.manifest.training.lr == pytest.approx(3e-4)
    assert loaded.manifest.corpus.sources[0].weight == 2
    assert loaded.resolved()["_resolved"]["overrides"] == ["training.lr=3e-4",
                                                           "corpus.sources[0].weight=2"]


def test_errors_name_file_line_and_field(tmp_path):
    bad = MINIMAL.replace("path: a.jsonl.gz", "path: a.jsonl.gz\n      weight: 0\n      txt: x")
    p = write(tmp_path, bad, "biomedical.yaml")
    with pytest.raises(mf.ManifestError) as e:
        mf.load(p)
    lines = e.value.problems
    assert f"{p}:9 corpus.sources[0].weight: must be > 0.0" in lines
    assert any(l.startswith(f"{p}:10 corpus.sources[0].txt: unknown field") for l in lines)


def test_error_in_a_scale_points_at_the_override_line(tmp_path):
    p = write(tmp_path, MINIMAL.replace("training: {steps: 2, seq_length: 16}",
                                        "training: {steps: -2, seq_length: 16}"))
    with pytest.raises(mf.ManifestError) as e:
        mf.load(p, scale="small")
    assert e.value.problems == [f"{p}:18 training.steps: must be > 0"]
    mf.load(p)  # the paper-scale recipe itself is fine


def test_bad_set_is_located_as_an_override(tmp_path):
    with pytest.raises(mf.ManifestError) as e:
        mf.load(write(tmp_path, MINIMAL), overrides=["training.lrr=1"])
    assert e.value.problems[0].startswith("--set:1 training.lrr: unknown field; did you mean 'lr'?")


def test_unsupported_combination_says_not_supported_yet(tmp_path):
    p = write(tmp_path, MINIMAL.replace("kind: wordpiece", "kind: bpe"))
    with pytest.raises(mf.ManifestError) as e:
        mf.load(p)
    assert "tokenizer.kind" in e.value.problems[0] and "not supported yet" in e.value.problems[0]


def test_strategy_and_base_must_agree(tmp_path):
    with pytest.raises(mf.ManifestError) as e:
        mf.load(write(tmp_path, MINIMAL.replace("family: bert", "family: bert\nstrategy: continued")))
    text = "\n".join(e.value.problems)
    assert "base: a continued run needs" in text
    assert "model.size: a continued run takes its dimensions" in text


def test_unknown_scale_lists_the_known_ones(tmp_path):
    with pytest.raises(mf.ManifestError, match="unknown scale 'huge' .scales: small."):
        mf.load(write(tmp_path, MINIMAL), scale="huge")


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    with pytest.raises(mf.ManifestError, match="yaml"):
        mf.load(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


def test_budget_in_tokens_becomes_steps(tmp_path):
    loaded = mf.load(write(tmp_path, MINIMAL.replace("steps: 10", "tokens: 1000")))
    assert loaded.manifest.training.total_steps == 4   # ceil(1000 / (8 * 32))


def test_megatron_engine_options_need_the_megatron_engine(tmp_path):
    with pytest.raises(mf.ManifestError) as e:
        mf.load(write(tmp_path, MINIMAL), overrides=["parallel.distributed_optimizer=false"])
    assert "distributed_optimizer: only for engine: megatron" in e.value.problems[0]
    loaded = mf.load(write(tmp_path, MINIMAL), overrides=[
        "parallel.engine=megatron", "parallel.distributed_optimizer=false"])
    assert loaded.manifest.parallel.distributed_optimizer is False
