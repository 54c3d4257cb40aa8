"""Hugging Face weights are read from safetensors only: a pickle a user hands in
(`pytorch_model.bin`) is refused in one line and never unpickled, even beside safetensors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from factory.stage import UserError
from tests.conftest import REPO


def _payload(marker):
    class Payload:     # unpickling it creates `marker`: code run from the file
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Payload())


def _tiny_bert(folder):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)


def test_a_pickle_beside_safetensors_is_never_read(tmp_path):
    from transformers import AutoModelForMaskedLM

    from factory.hf_weights import from_pretrained

    _tiny_bert(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "pytorch_model.bin").write_bytes(_payload(marker))
    model = from_pretrained(AutoModelForMaskedLM, tmp_path)
    assert model.config.vocab_size == 64
    assert not marker.exists()

    # Without the safetensors transformers would fall back to the pickle; we refuse.
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"only pickle weights .*save_pretrained"):
        from_pretrained(AutoModelForMaskedLM, tmp_path)
    assert not marker.exists()


def test_factory_bench_refuses_a_pickle_folder_in_one_line(tmp_path):
    model = tmp_path / "model"
    _tiny_bert(model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (model / "pytorch_model.bin").write_bytes(_payload(marker))
    done = subprocess.run([sys.executable, "-m", "factory.cli", "bench", str(model), "--suite",
                           "blurb", "--no-mlflow", "--output", str(tmp_path / "out" / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1
    assert "only pickle weights" in done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
