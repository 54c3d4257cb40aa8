"""Running datatrove pipelines: LocalPipelineExecutor here, SlurmPipelineExecutor on a
cluster (`corpus.executor`), the same steps on both; counters from the merged stats.

datatrove logs every task at INFO on stderr; here only WARNING and up reach the console (full
logs go to <logging_dir>/logs/task_*.log) so the rich progress stays readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

from factory.corpus.options import Executor
from factory.stage import UserError

logger = logging.getLogger(__name__)

SLURM_POLL_S = 30


@contextlib.contextmanager
def _quiet_datatrove():
    """datatrove logs every task at INFO on stderr and exact dedup draws tqdm bars: keep
    WARNING and up there (full logs still go to logs/*/logs/task_*.log) so the rich progress
    stays readable."""
    from datatrove.executor import base
    from loguru import logger as loguru

    orig_add, orig_close = base.add_task_logger, base.close_task_logger
    fmt = "{time:HH:mm:ss} | {level: <8} | {name}:{line} - {message}"

    def add(logging_dir, rank, local_rank=0, node_rank=-1):
        loguru.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        loguru.add(sys.stderr, level="WARNING", format=fmt)
        loguru.add(logfile, level="DEBUG", format=fmt)
        return logfile

    def close(logfile):
        loguru.complete()
        loguru.remove()
        loguru.add(sys.stderr, level="WARNING", format=fmt)
        logfile.close()

    # exact and minhash dedup draw tqdm bars of their own on stderr
    from datatrove.pipeline.dedup import exact_dedup, minhash

    orig = {m: m.tqdm for m in (exact_dedup, minhash)}
    base.add_task_logger, base.close_task_logger = add, close
    for m, t in orig.items():
        m.tqdm = functools.partial(t, disable=True)
    try:
        yield
    finally:
        base.add_task_logger, base.close_task_logger = orig_add, orig_close
        for m, t in orig.items():
            m.tqdm = t


def _local(pipeline, tasks: int, logging_dir: Path, opts: Executor):
    from datatrove.executor import LocalPipelineExecutor

    class QuietLocalExecutor(LocalPipelineExecutor):
        def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
            with _quiet_datatrove():
                return super()._run_for_rank(rank, local_rank, node_rank)

    workers = max(1, min(tasks, opts.workers or os.cpu_count() or 1))
    return QuietLocalExecutor(pipeline, tasks=tasks, workers=workers,
                              logging_dir=str(logging_dir), skip_completed=False)


def _slurm(pipeline, tasks: int, logging_dir: Path, opts: Executor, name: str):
    from datatrove.executor import SlurmPipelineExecutor

    # The factory's own interpreter runs the tasks: the cluster image has the same venv.
    venv = os.environ.get("VIRTUAL_ENV") or str(Path(sys.executable).parents[1])
    return SlurmPipelineExecutor(
        pipeline, tasks=tasks, time=opts.time, partition=opts.partition,
        cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb,
        workers=opts.workers or -1, job_name=f"factory-{name}", venv_path=venv,
        sbatch_args=dict(opts.sbatch_args) or None, logging_dir=str(logging_dir),
        skip_completed=True)


def _wait_for_slurm(logging_dir: Path, tasks: int, name: str) -> None:
    """Blocks until every task of a submitted pipeline wrote its completion marker. A task
    that failed leaves no marker: the wait ends with an error when no job is left queued."""
    done = logging_dir / "completions"
    while True:
        n = len(list(done.glob("*"))) if done.is_dir() else 0
        if n >= tasks:
            return
        queued = os.popen(f"squeue -h -n factory-{name} 2>/dev/null | wc -l").read().strip()
        if queued == "0":
            time.sleep(SLURM_POLL_S)     # a last marker may still be on its way
            n = len(list(done.glob("*"))) if done.is_dir() else 0
            if n >= tasks:
                return
            raise UserError(f"corpus: slurm pipeline {name} ended with {n}/{tasks} tasks "
                            f"complete; see {logging_dir}/logs and rerun (finished tasks "
                            "are skipped)")
        time.sleep(SLURM_POLL_S)


def execute(pipeline, tasks: int, logging_dir: Path, opts: Executor | None = None,
            name: str = "corpus") -> dict[str, float]:
    """Run a pipeline to completion; our counters from its merged stats. The executor's own
    summary (INFO/SUCCESS, in this process) is kept off the console too."""
    from datatrove.utils.logging import setup_default_logger
    from loguru import logger as loguru

    opts = opts or Executor()
    loguru.remove()
    loguru.add(sys.stderr, level="WARNING")
    try:
        if opts.kind == "slurm":
            _slurm(pipeline, tasks, logging_dir, opts, name).run()
            _wait_for_slurm(logging_dir, tasks, name)
            _merge_stats(logging_dir)
        else:
            _local(pipeline, tasks, logging_dir, opts).run()
    finally:
        setup_default_logger()
    return counters(logging_dir / "stats.json")


def _merge_stats(logging_dir: Path) -> None:
    """The merged stats.json of a slurm run (its executor merges only in a later job)."""
    from datatrove.utils.stats import PipelineStats

    parts = sorted((logging_dir / "stats").glob("*.json"))
    merged = sum((PipelineStats.from_json(json.loads(p.read_text())) for p in parts),
                 start=PipelineStats())
    (logging_dir / "stats.json").write_text(merged.to_json())


def counters(stats_json: Path) -> dict[str, float]:
    """Our `<step>:<source>:<what>` counters from an executor's merged stats.json."""
    out: dict[str, float] = {}
    for block in json.loads(stats_json.read_text()):
        for k, v in (block.get("stats") or {}).items():
            if k.count(":") >= 2:
                out[k] = out.get(k, 0) + (v["total"] if isinstance(v, dict) else v)
    return out


