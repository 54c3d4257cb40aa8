"""A suite run with its outputs: progress bars, results.json, the markdown table, MLflow.

Shared by `factory bench` and the evaluate stage, which both hand over a StageContext (the
CLI builds one around a rich console and an MLflow run of the `bench` experiment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from factory.stage import StageContext

log = logging.getLogger(__name__)

LOG_EVERY = 10          # MLflow metric points per fine-tuning run: every Nth step


class Tracks:
    """Turns a bench progress callback (phase, done, total, values) into one ctx.track bar per
    phase, and the training phase's numbers into step metrics `<prefix>_<name>`."""

    def __init__(self, ctx: StageContext, prefix: str):
        self.ctx = ctx
        self.prefix = prefix
        self.phase: str | None = None
        self.done = 0
        self.task = None
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Tracks:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def __call__(self, phase: str, done: int, total: int, values: dict[str, float]) -> None:
        if phase != self.phase or done < self.done:
            self.stack.close()
            self.stack = contextlib.ExitStack()
            self.task = self.stack.enter_context(self.ctx.track(total, f"{self.prefix} {phase}"))
            self.phase, self.done = phase, 0
        self.task.advance(done - self.done, **values)
        self.done = done
        if phase == "train" and values and (done % LOG_EVERY == 0 or done == total):
            self.ctx.log.metrics({f"{self.prefix}_{k}": v for k, v in values.items()}, step=done)


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name: `blurb_NCBI-disease_entity_f1`."""
    return "_".join(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)


def headline_metrics(results: dict) -> dict[str, float]:
    """{suite_task_metric: mean, ..._std, suite_score} of one suite's results."""
    suite = results["suite"]
    out: dict[str, float] = {}
    for name, r in results["tasks"].items():
        out[metric_key(suite, name, r["metric"])] = r["mean"]
        out[metric_key(suite, name, r["metric"], "std")] = r["std"]
        for k, v in r["extra"].items():
            out[metric_key(suite, name, k)] = v
    if results["score"] is not None:
        out[metric_key(suite, "score")] = results["score"]
    return out


def run_and_record(ctx: StageContext, model_dir: Path, suite: str, stem: str = "results",
                   **kwargs: Any) -> dict:
    """run_suite with progress bars and step metrics; writes <stem>.json and <stem>.md into
    ctx.out, logs them as artifacts and the headline numbers as metrics."""
    from factory.bench.report import markdown
    from factory.bench.runner import run_suite

    stack = contextlib.ExitStack()

    def progress_for(task: str):
        stack.close()
        return stack.enter_context(Tracks(ctx, metric_key(suite, task)))

    with stack:
        results = run_suite(model_dir, suite, progress_for=progress_for, **kwargs)
    table = markdown(results)
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    ctx.log.metrics(headline_metrics(results))
    ctx.log.artifact(out / f"{stem}.json")
    ctx.log.artifact(out / f"{stem}.md")
    return {**results, "markdown": table}


def bench_to_files(model_dir: Path, suite: str, output: Path, *, mlflow: bool = True,
                   **kwargs: Any) -> dict:
    """`factory bench`: results.json at `output`, the table beside it (same stem, .md)."""
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    from factory.hf_weights import require_safetensors
    from factory.stage import MemoryLog, Progress

    require_safetensors(Path(model_dir))    # before any tracking run or data is touched
    output = Path(output)
    run_log = MemoryLog()
    tracker_run = None
    if mlflow:
        from factory.tracking import Tracker

        tracker_run = Tracker("bench").start_parent(
            f"{suite} {Path(model_dir).name}", {"factory.model": str(model_dir),
                                                "factory.suite": suite})
        tracker_run.params({k: str(v) for k, v in kwargs.items()})
        run_log = tracker_run
    status = "FAILED"
    try:
        with RichProgress(console=Console(stderr=True), transient=True) as rp:
            ctx = StageContext(out=output.parent, inputs={}, log=run_log,
                               progress=Progress(rp))
            results = run_and_record(ctx, Path(model_dir), suite, stem=output.stem, **kwargs)
        status = "FINISHED"
    finally:
        if tracker_run is not None:
            tracker_run.end(status)
    log.info("results in %s", output)
    return results
