"""Exact resume: a pretrain run SIGKILLed after a checkpoint continues to the same losses.

The killed attempt runs in a subprocess (this file is its script); the rerun and the
uninterrupted reference run in the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.train.conftest import REPO, pretrain_stage

STEPS, INTERVAL = 12, 4


def _run(family: str, out: Path, inputs: dict[str, Path]):
    from factory.stage import MemoryLog, StageContext

    stage = pretrain_stage(family, f"training.steps={STEPS}",
                           f"training.checkpoint_interval={INTERVAL}")
    log = MemoryLog()
    out.mkdir(parents=True, exist_ok=True)
    metrics = stage.run(StageContext(out=out, inputs=inputs, log=log))
    return metrics, log


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _kill_after_checkpoint(family: str, out: Path, inputs: dict[str, Path], step: int) -> int:
    """Start the stage in a subprocess; SIGKILL it as soon as latest.txt names `step`."""
    return kill_after_checkpoint(
        [sys.executable, "-m", "tests.train.test_resume", family, str(out),
         str(inputs["vocab"]), str(inputs["pack"])], out, step)


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout: float = 120) -> int:
    """Run `cmd` (a pretrain run into `out`) in its own session; SIGKILL the whole session
    as soon as out/checkpoints/latest.txt names `step`. Returns the step latest.txt names."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out.parent / f"{out.name}.log", "wb")
    # The child (or torchrun) makes its own rendezvous.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest.txt"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == str(step):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before checkpoint {step}: "
                            f"{(out.parent / f'{out.name}.log').read_text()[-2000:]}")
            time.sleep(0.01)
        else:
            pytest.fail(f"no checkpoint {step} within {timeout} s: "
                        f"{(out.parent / f'{out.name}.log').read_text()[-2000:]}")
    finally:
        # Every descendant, then the session: torchrun starts its workers in sessions of their
        # own, so killing its session alone leaves them training on to the last step.
        tree = _descendants(proc.pid)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        log_file.close()
        assert not alive, f"still running after SIGKILL: {alive}"
    return int(latest.read_text())


def _descendants(pid: int) -> list:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


# About 25 s. BERT's SIGKILL resume is covered at TP=2 in test_distributed.py; this one keeps
# GPT's (with dropout on) in one process.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt"])
def test_killed_run_resumes_exactly(family, tmp_path, request):
    inputs = request.getfixturevalue(f"{family}_inputs")
    ref_metrics, _ = _run(family, tmp_path / "reference", inputs)
    reference = _losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, STEPS + 1))

    out = tmp_path / "attempt"
    killed_at = _kill_after_checkpoint(family, out, inputs, INTERVAL)
    assert killed_at == INTERVAL
    assert (out / "checkpoints" / f"iter_{INTERVAL:07d}" / "extra" / "rank00000.pt").is_file()
    assert max(_losses(out)) < STEPS, "the kill came too late to test anything"

    metrics, log = _run(family, out, inputs)
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl not cut back to the checkpoint"
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), f"step {step}"
    # The tracker saw the whole curve once: replayed steps, then the new ones.
    assert [s for s, _ in log.history if s is not None] == list(range(1, STEPS + 1))
    assert [v["loss"] for s, v in log.history if s is not None] == [resumed[s] for s in range(1, STEPS + 1)]
    assert metrics["final_loss"] == pytest.approx(ref_metrics["final_loss"], abs=1e-6)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["iter_0000008", "iter_0000012", "latest.txt"]


def test_interrupted_save_and_torn_metrics_line_are_ignored(bert_inputs, tmp_path):
    """What a kill during checkpoint 4 leaves: a .tmp folder, latest.txt still at 2, metrics
    lines past 2 (the last one cut short). The rerun trusts only latest.txt."""
    from factory.stage import MemoryLog, StageContext

    stage = pretrain_stage("bert", "training.steps=4", "training.checkpoint_interval=2")
    ref = tmp_path / "reference"
    ref.mkdir()
    stage.run(StageContext(out=ref, inputs=bert_inputs, log=MemoryLog()))

    # The data position: the blend phase and the samples consumed (global batch 16).
    import torch

    extra = torch.load(ref / "checkpoints" / "iter_0000004" / "extra" / "rank00000.pt",
                       weights_only=True)
    assert (extra["phase"], extra["consumed_samples"], extra["step"]) == ("main", 64, 4)

    out = tmp_path / "attempt"
    shutil.copytree(ref, out)
    ckpts = out / "checkpoints"
    (ckpts / "iter_0000004").rename(ckpts / ".tmp_iter_0000004")
    (ckpts / ".tmp_iter_0000004" / "extra" / "rank00000.pt").write_bytes(b"torn")
    (ckpts / "latest.txt").write_text("2\n")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:20])

    log = MemoryLog()
    stage.run(StageContext(out=out, inputs=bert_inputs, log=log))
    assert not (ckpts / ".tmp_iter_0000004").exists()
    assert (ckpts / "latest.txt").read_text().strip() == "4"
    assert [s for s, _ in log.history if s is not None] == [1, 2, 3, 4]
    resumed, reference = _losses(out), _losses(ref)
    assert resumed.keys() == reference.keys()
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6)


if __name__ == "__main__":
    family, out, vocab, pack = sys.argv[1:5]
    _run(family, Path(out), {"vocab": Path(vocab), "pack": Path(pack)})
