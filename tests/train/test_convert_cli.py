"""`factory convert hf-to-megatron | megatron-to-hf`: a round trip through the CLI is exact,
and bad input is one line (exit 2) before any weight is read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from factory.stage import UserError
from tests.train.conftest import REPO, needs_pubmed, pubmed_texts, train_tokenizer
from tests.train.test_convert import _assert_same_tensors, _tiny_llama


def _factory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factory.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@needs_pubmed
def test_llama_round_trip_through_the_cli_is_exact(tmp_path):
    """HF Llama -> `factory convert hf-to-megatron` -> megatron_to_hf: bit-identical tensors."""
    from factory.train.convert import read_safetensors

    base = tmp_path / "base"
    _tiny_llama(base, tie=False)
    train_tokenizer("bpe", pubmed_texts(40), 300, base)

    done = _factory("convert", "hf-to-megatron", str(base), str(tmp_path / "meg"))
    assert done.returncode == 0, done.stderr[-2000:]
    meg = tmp_path / "meg"
    assert json.loads((meg / "model.json").read_text())["num_query_groups"] == 2
    assert (meg / "checkpoints" / "latest.txt").read_text().strip() == "0"
    assert (meg / "checkpoints" / "iter_0000000" / "model").is_dir()
    assert (meg / "tokenizer" / "tokenizer.json").is_file()

    # The way back in this process (the CLI command is the same one-line call; a second
    # subprocess would cost another megatron import).
    from factory.train.convert.folders import megatron_to_hf

    summary = megatron_to_hf(meg, tmp_path / "hf")
    assert summary["step"] == 0 and summary["tokenizer"]
    _assert_same_tensors(read_safetensors(base), read_safetensors(tmp_path / "hf"), 500, 512)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("the cell") == \
        AutoTokenizer.from_pretrained(base).encode("the cell")

    # A Megatron folder from someone else whose checkpoint index would run code when torch
    # unpickles it: refused before loading, and the code never runs.
    import pickle
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(meg, bad)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    index = bad / "checkpoints" / "iter_0000000" / "model" / ".metadata"
    index.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"\.metadata: refers to io\.open"):
        megatron_to_hf(bad, tmp_path / "hf_bad")
    assert not marker.exists() and not (tmp_path / "hf_bad").exists()


def test_unsupported_architecture_is_one_line_before_weights(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (src / "model.safetensors").write_bytes(b"never read")
    done = _factory("convert", "hf-to-megatron", str(src), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "model_type 'gpt2' is not supported" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_vocabulary_rows_must_match_the_config(tmp_path):
    from factory.train.convert.folders import hf_to_megatron

    base = tmp_path / "base"
    _tiny_llama(base, tie=True)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))
    with pytest.raises(UserError, match="has 500 rows but config.json says vocab_size 400"):
        hf_to_megatron(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_destination_must_be_new_and_source_a_megatron_folder(tmp_path):
    from factory.train.convert.folders import hf_to_megatron, megatron_to_hf

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not empty"):
        hf_to_megatron(tmp_path, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="model.json: missing"):
        megatron_to_hf(tmp_path / "nothing", tmp_path / "hf")
