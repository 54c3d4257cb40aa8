"""benchmarks/gpu_check.sh keeps working: its dry run (CPU, toy sizes) goes through every
section the GPU run measures, on inputs made by benchmarks/gpu_prepare.sh, so the scripts a
GPU lease depends on cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.train.test_compiled import _can_compile


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
           "GPU_CHECK_SECTIONS": "check,gpt_1b,bert_base"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["check"]["bert"]["ok"] and out["check"]["gpt"]["ok"]
    assert out["check"]["gpt"]["max_abs_logit_diff_fp32"] < 1e-4
    # Without a C++ compiler (CPU) the compiled rows record why and lose no other.
    compiled = {"hf-compiled", "megatron-compiled"} if _can_compile() else set()
    runs = out["gpt_1b"]["runs"]
    for engine in ("torch", "megatron", *(["torch-compiled"] if compiled else [])):
        run = runs[engine]["2"]
        assert run["tokens_per_s"] > 0
        assert run["losses"][-1] < run["losses"][0], engine     # the loop's step trains
    if not compiled:
        assert "error" in runs["torch-compiled"]
    shape = out["bert_base"]["4x32"]
    assert set(shape["step_s"]) == {"hf", "megatron", "megatron-fullhead", "megatron-its-tp-ops",
                                    "megatron-engine", *compiled}
    assert set(shape["errors"]) == {"hf-compiled", "megatron-compiled"} - compiled
    assert "error" not in out["bert_base"] and "error" not in out["gpt_1b"]
    assert (tmp_path / "gpt_profile.txt").stat().st_size > 0
    assert (tmp_path / "gpt_profile_megatron.txt").stat().st_size > 0
    profiles = (tmp_path / "bert_profile.txt").read_text()
    assert "== megatron 4x32" in profiles and "== megatron-its-tp-ops 4x32" in profiles
    # The A/B of plain_tp on the GPU: host time per step of both sides; training.compile's
    # rows (HF's compiled as well) beside them.
    assert {"megatron", "megatron-its-tp-ops", *compiled} <= set(shape["profile_summary"])


@pytest.mark.slow  # a smoke run up to pack, then the stage section three times: about 70 s
def test_prepared_inputs_feed_the_pretrain_stage_section(tmp_path):
    """gpu_prepare.sh's vocab/ and pack/ (the wheels are left out: no download in a test) run
    the real pretrain stage under both engines and compiled, and each resumes from its step-30
    checkpoint to the uninterrupted losses."""
    env = {**os.environ, "PYTHON": sys.executable, "SKIP_WHEELS": "1"}
    inputs = tmp_path / "inputs"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_prepare.sh"), "",
                           str(inputs)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (inputs / "vocab" / "tokenizer" / "tokenizer.json").is_file()
    assert (inputs / "pack" / "pack.json").is_file()
    env.update(DRY_RUN="1", GPU_CHECK_SECTIONS="pretrain_stage")
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "",
                           str(tmp_path / "out"), str(inputs)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["pretrain_stage"]
    for engine in ("torch", "megatron", *(["torch-compiled"] if _can_compile() else [])):
        run = stage[engine]
        assert run["steps"] == 40 and run["last_loss"] < run["first_loss"], engine
        assert run["resume"]["from_step"] == 30
        assert run["resume"]["max_abs_loss_diff"] == 0.0, engine
