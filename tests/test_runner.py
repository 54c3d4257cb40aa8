"""Cache keys and atomic outputs of the runner (no training: plans and folders only)."""

import gzip
import shutil

import pytest

from factory import manifest as mf, runner
from factory.stage import UserError
from tests.conftest import REPO


def _copy_domain(tmp_path):
    dst = tmp_path / "domains"
    shutil.copytree(REPO / "domains", dst)
    return dst / "biomedical.yaml"


def _keys(path, overrides=()):
    return {p.stage.name: p.key for p in runner.plan(mf.load(path, "smoke", list(overrides)))}


def test_changing_lr_changes_only_pretrain_and_later_keys(tmp_path):
    path = _copy_domain(tmp_path)
    a, b = _keys(path), _keys(path, ["training.lr=1e-3"])
    assert [n for n in a if a[n] != b[n]] == ["pretrain", "export", "evaluate"]


def test_changing_one_corpus_byte_changes_every_key(tmp_path):
    path = _copy_domain(tmp_path)
    before = _keys(path)
    data = path.parent / "biomedical/pubmed/train.jsonl.gz"
    raw = bytearray(gzip.decompress(data.read_bytes()))
    i = raw.index(b'"text": "') + 10
    raw[i] = ord("X") if raw[i] != ord("X") else ord("Y")
    data.write_bytes(gzip.compress(bytes(raw)))
    after = _keys(path)
    assert all(before[n] != after[n] for n in before)


def test_keys_survive_moving_the_project_but_not_moving_a_file_in_it(tmp_path):
    a = _keys(_copy_domain(tmp_path / "a"))
    moved = _copy_domain(tmp_path / "somewhere" / "else")
    assert _keys(moved) == a
    # Inside the folder the relative path still counts: the config names another file.
    pubmed = moved.parent / "biomedical" / "pubmed"
    shutil.copytree(pubmed, pubmed.parent / "pubmed2")
    renamed = _keys(moved, ["corpus.sources.0.path=biomedical/pubmed2/train.jsonl.gz"])
    assert renamed["corpus"] != a["corpus"]


def test_general_text_enters_vocab_and_pack_keys_and_a_missing_one_is_one_line(tmp_path):
    path = _copy_domain(tmp_path)
    before = _keys(path)
    mine = path.parent / "general" / "mine.jsonl.gz"
    mine.write_bytes((path.parent / "maltese/korpus_malti/heldout.jsonl.gz").read_bytes())
    loaded = mf.load(path, "smoke", ["corpus.general_text=general/mine.jsonl.gz"])
    after = {p.stage.name: p.key for p in runner.plan(loaded)}
    assert before["corpus"] == after["corpus"]
    assert all(before[n] != after[n] for n in ("vocab", "pack", "pretrain"))
    pack = next(p.stage for p in runner.plan(loaded) if p.stage.name == "pack")
    assert pack.config.general_text == str(mine)

    missing = mf.load(path, "smoke", ["corpus.general_text=general/nope.jsonl.gz"])
    planned = runner.plan(missing)
    with pytest.raises(UserError) as e:
        runner.check(planned, runner.select(planned, None, None))
    assert str(e.value) == (f"corpus.general_text: {path.parent / 'general/nope.jsonl.gz'} does "
                            "not exist; give a JSON Lines file with a `text` field, or drop the "
                            "field for the shipped English sample")


def test_swap_replaces_atomically(tmp_path):
    final, tmp = tmp_path / "stage", tmp_path / ".tmp" / "stage-new"
    final.mkdir()
    (final / "old").write_text("old")
    tmp.mkdir(parents=True)
    (tmp / "new").write_text("new")
    runner._swap(tmp, final)
    assert (final / "new").read_text() == "new" and not (final / "old").exists()
    assert not tmp.exists()


def test_only_needs_up_to_date_inputs(tmp_path):
    loaded = mf.load(_copy_domain(tmp_path), "smoke")
    with pytest.raises(UserError, match="stage 'vocab' has no output"):
        runner._check_upstream(runner.plan(loaded), tmp_path / "run", "pretrain")


def test_until_selects_a_prefix_and_torchrun_selects_pretrain(tmp_path, monkeypatch):
    planned = runner.plan(mf.load(_copy_domain(tmp_path), "smoke"))
    assert runner.select(planned, None, "pack") == {"corpus", "vocab", "pack"}
    assert runner.select(planned, "export", None) == {"export"}
    with pytest.raises(UserError, match="--until 'packing': unknown stage"):
        runner.select(planned, None, "packing")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runner.select(planned, None, None) == {"pretrain"}
    with pytest.raises(UserError, match="under torchrun"):
        runner.select(planned, None, "pack")
    with pytest.raises(UserError, match="under torchrun"):
        runner.select(planned, "evaluate", None)
