"""Runs a manifest's stage graph: content-hash caching, atomic stage outputs, resume, tracking.

Cache key of a stage = sha256(factory version, stage name, its resolved config, the content
fingerprints it declares, its inputs' keys). Paths inside the manifest's folder enter the key
relative to it, so a moved or re-cloned project (or a container that mounts it elsewhere)
keeps its cached stages; the files' contents are in the fingerprints. A stage writes into
`RUN/.tmp/<stage>-<key>` and the folder is renamed to `RUN/<stage>` only once the stage
succeeded, so a crash never leaves a half output that a later run trusts; the temporary folder
of a killed stage is kept and handed to the rerun of the same key (the pretrain stage resumes
from its checkpoints there).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pipelines
from factory import __version__
from factory.manifest import Loaded
from factory.stage import Progress, Stage, StageContext, UserError

log = logging.getLogger(__name__)

# Imported lazily: the stage modules pull in megatron, datatrove and transformers.
STAGES: dict[str, str] = {
    "corpus": "factory.corpus.stage:CorpusStage",
    "vocab": "factory.vocab:VocabStage",
    "pack": "factory.corpus.pack:PackStage",
    "pretrain": "factory.train.stage:PretrainStage",
    "export": "factory.train.export:ExportStage",
    "evaluate": "factory.evaluate:EvaluateStage",
}
RECORD = ".stage.json"
# Stages that run on every rank under torchrun (collective work); all others are single-process.
DISTRIBUTED = ("pretrain",)
# "1": log under the parent run this run directory's previous command recorded (summary.json)
# instead of starting a new one: the three commands of one `factory launch` job, one MLflow run.
CONTINUE_ENV = "FACTORY_MLFLOW_CONTINUE"


def stage_class(name: str) -> type[Stage]:
    module, _, attr = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Planned:
    stage: Stage
    inputs: tuple[str, ...]
    register: str | None
    key: str = ""


@dataclass
class Outcome:
    status: str
    output: Path
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def default_run_dir(loaded: Loaded, root: Path) -> Path:
    return root / f"{loaded.manifest.name}-{loaded.scale or 'full'}"


def plan(loaded: Loaded) -> list[Planned]:
    pipe = pipelines.load(loaded.manifest.strategy)
    out: list[Planned] = []
    keys: dict[str, str] = {}
    for ref in pipe.stages:
        stage = stage_class(ref.name).from_manifest(loaded)
        p = Planned(stage, ref.inputs, ref.register)
        p.key = _key(stage, {i: keys[i] for i in ref.inputs}, loaded.root)
        keys[ref.name] = p.key
        out.append(p)
    return out


def _key(stage: Stage, input_keys: dict[str, str], root: Path) -> str:
    blob = json.dumps({
        "factory": __version__,
        "stage": stage.name,
        "config": _portable(stage.config.model_dump(mode="json"), root),
        "fingerprint": stage.fingerprint(),
        "inputs": input_keys,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _portable(value: Any, root: Path) -> Any:
    """`value` with every absolute path inside `root` written as `$MANIFEST_DIR/<relative>`."""
    if isinstance(value, dict):
        return {k: _portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        p = Path(value)
        if p.is_relative_to(root):
            return "$MANIFEST_DIR/" + p.relative_to(root).as_posix()
    return value


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def check(planned: list[Planned], selected: set[str]) -> None:
    """Every problem the stages can see before work starts, all at once."""
    problems = [p for pl in planned if pl.stage.name in selected for p in pl.stage.check()]
    if problems:   # stages sharing a field (corpus.general_text) report it once
        raise UserError("\n".join(dict.fromkeys(problems)))


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def select(planned: list[Planned], only: str | None, until: str | None) -> set[str]:
    """The stages this invocation runs: all, one (`--only`), or a prefix (`--until`)."""
    names = [pl.stage.name for pl in planned]
    for flag, value in (("--only", only), ("--until", until)):
        if value is not None and value not in names:
            raise UserError(f"{flag} {value!r}: unknown stage (stages: {', '.join(names)})")
    if only is not None and until is not None:
        raise UserError("--only and --until exclude each other; give one")
    if world()[1] > 1:
        # Under torchrun every rank runs this; only the collective stage belongs here.
        if until is not None or only not in (None, *DISTRIBUTED):
            raise UserError(f"under torchrun (WORLD_SIZE={world()[1]}) only --only "
                            f"{' / '.join(DISTRIBUTED)} runs; run the other stages in one "
                            "process (factory run MANIFEST --until pack, then without torchrun)")
        only = only or DISTRIBUTED[0]
    if only is not None:
        return {only}
    if until is not None:
        return set(names[:names.index(until) + 1])
    return set(names)


def run(loaded: Loaded, run_dir: Path, *, force: bool = False, only: str | None = None,
        until: str | None = None, tracker_factory: Callable[[str], Any] | None = None,
        progress: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict:
    """Run (or reuse) the selected stages; returns the summary also written to RUN/summary.json.

    `progress` makes the rich Progress display; it starts only once every check has passed,
    so a user error prints alone. Under torchrun, ranks other than 0 run the pretrain stage
    into the same folder without tracking or records (`run_rank`).
    """
    run_dir = run_dir.resolve()
    planned = plan(loaded)
    selected = select(planned, only, until)
    check(planned, selected)
    if len(selected) == 1:
        (only,) = selected
        _check_upstream(planned, run_dir, only)
    if world()[0] != 0:
        return run_rank(next(p for p in planned if p.stage.name in selected), run_dir)

    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "manifest.resolved.yaml", _yaml(loaded.resolved()))

    from factory import tracking

    tracker = (tracker_factory or tracking.Tracker)(loaded.manifest.name)
    parent = _continued_parent(tracker, run_dir)
    if parent is None:
        parent = tracker.start_parent(
            f"{loaded.manifest.name}-{loaded.scale or 'full'}",
            tags={"factory.run_dir": str(run_dir), "factory.scale": loaded.scale or "full",
                  "factory.family": loaded.manifest.family,
                  "factory.strategy": loaded.manifest.strategy,
                  "factory.version": __version__,
                  "factory.stages": ",".join(p.stage.name for p in planned
                                             if p.stage.name in selected)})
        parent.params(tracking.flatten(loaded.resolved()))
        parent.artifact(run_dir / "manifest.resolved.yaml")

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment,
                   "run_id": parent.run_id},
        "stages": {},
    }
    model_name = f"{loaded.manifest.name}-{loaded.manifest.family}"
    status = "FINISHED"
    display = progress() if progress is not None else contextlib.nullcontext()
    try:
        with display as rich_progress:
            _run_all(planned, run_dir, force, selected, tracker, parent, summary, model_name,
                     Progress(rich_progress) if rich_progress is not None else None)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        _report(run_dir, parent)
        parent.end(status)
    return summary


def _continued_parent(tracker, run_dir: Path):
    """With CONTINUE_ENV=1 (set by `factory launch` for a job's later commands), the parent
    run the previous command of this run directory recorded in summary.json, reopened; else
    None (a new parent run)."""
    if os.environ.get(CONTINUE_ENV) != "1":
        return None
    try:
        previous = json.loads((run_dir / "summary.json").read_text())["mlflow"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if previous.get("tracking_uri") != tracker.uri or not previous.get("run_id"):
        return None
    return tracker.continue_parent(previous["run_id"])


def _report(run_dir: Path, parent) -> None:
    """The run's report page; a failure to draw it must not hide the run's own outcome."""
    from factory.report import run_report

    try:
        paths = run_report(run_dir)
    except Exception as e:  # noqa: BLE001 - reported, and the stages' outputs stand
        log.warning("run report not written: %s: %s", e.__class__.__name__, e)
        return
    for path in paths:
        parent.artifact(path, "report")
    log.info("report: %s", run_dir / "report.html")


def _run_all(planned: list[Planned], run_dir: Path, force: bool, selected: set[str], tracker,
             parent, summary: dict, model_name: str, progress: Progress | None) -> None:
    for pl in planned:
        name = pl.stage.name
        if name not in selected:
            summary["stages"][name] = _entry(Outcome("skipped", run_dir / name, 0.0))
            continue
        outcome = _run_one(pl, run_dir, force, tracker, parent, progress, model_name)
        summary["stages"][name] = _entry(outcome)
        parent.metrics({f"{name}.{k}": v for k, v in outcome.metrics.items()})
        parent.flush()
        _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))


def _entry(o: Outcome) -> dict:
    return {"status": o.status, "output": str(o.output), "seconds": round(o.seconds, 3),
            "metrics": o.metrics}


def _check_upstream(planned: list[Planned], run_dir: Path, only: str) -> None:
    target = next(p for p in planned if p.stage.name == only)
    by_name = {p.stage.name: p for p in planned}
    for up in target.inputs:
        rec = read_record(run_dir / up)
        if rec is None or rec.get("key") != by_name[up].key:
            state = "has no output" if rec is None else "is out of date"
            raise UserError(f"--only {only}: stage {up!r} {state} in {run_dir}; "
                            "run without --only first")


def _tmp(pl: Planned, run_dir: Path) -> Path:
    return run_dir / ".tmp" / f"{pl.stage.name}-{pl.key[:16]}"


def run_rank(pl: Planned, run_dir: Path) -> dict:
    """A non-zero rank's share of a distributed stage: same folder as rank 0, no bookkeeping.

    Rank 0 owns the record, the MLflow runs and the final rename; the stage itself writes
    per-rank files only where they are collective (checkpoint shards).
    """
    final = run_dir / pl.stage.name
    rec = read_record(final)
    if rec is not None and rec.get("key") == pl.key:
        return {"run_dir": str(run_dir), "stages": {pl.stage.name: {"status": "cached"}}}
    tmp = _tmp(pl, run_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(out=tmp, inputs={i: run_dir / i for i in pl.inputs})
    metrics = pl.stage.run(ctx) or {}
    return {"run_dir": str(run_dir), "stages": {pl.stage.name: {
        "status": "done", "metrics": {k: float(v) for k, v in metrics.items()}}}}


def _run_one(pl: Planned, run_dir: Path, force: bool, tracker, parent, progress,
             model_name: str) -> Outcome:
    name, key = pl.stage.name, pl.key
    final = run_dir / name
    t0 = time.perf_counter()
    rec = read_record(final)
    if rec is not None and rec.get("key") == key and not force:
        child = tracker.start_child(parent, name, tags={
            "factory.stage": name, "factory.key": key, "cached": "true",
            "cached_from": rec.get("mlflow_run_id", "")})
        child.metrics(rec.get("metrics", {}))
        child.end()
        log.info("%s: cached (%s)", name, key[:12])
        return Outcome("cached", final, time.perf_counter() - t0, rec.get("metrics", {}))

    tmp = _tmp(pl, run_dir)
    tmp_root = tmp.parent
    tmp_root.mkdir(exist_ok=True)
    for stale in tmp_root.glob(f"{name}-*"):
        if stale != tmp or force:
            shutil.rmtree(stale, ignore_errors=True)
    resumed = tmp.exists()
    tmp.mkdir(exist_ok=True)

    child = tracker.start_child(parent, name, tags={
        "factory.stage": name, "factory.key": key, "cached": "false",
        "resumed": str(resumed).lower()})
    child.params({f"config.{k}": v for k, v in _flat_config(pl.stage).items()})
    ctx = StageContext(out=tmp, inputs={i: run_dir / i for i in pl.inputs}, log=child,
                       progress=progress)
    log.info("%s: running%s", name, " (resuming an interrupted attempt)" if resumed else "")
    try:
        metrics = {k: float(v) for k, v in (pl.stage.run(ctx) or {}).items()}
    except BaseException as e:
        child.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.perf_counter() - t0
    child.metrics(metrics)
    child.metrics({"seconds": seconds})
    record = {"stage": name, "key": key, "factory_version": __version__,
              "config": pl.stage.config.model_dump(mode="json"), "metrics": metrics,
              "seconds": seconds, "mlflow_run_id": child.run_id,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / RECORD).write_text(json.dumps(record, indent=2))
    _swap(tmp, final)
    if pl.register:
        child.artifact(final / pl.register, pl.register)
        version = tracker.register_model(model_name, child, pl.register)
        child.tags({"registered_model_version": str(version)})
    child.end()
    return Outcome("done", final, seconds, metrics)


def _flat_config(stage: Stage) -> dict[str, str]:
    from factory.tracking import flatten

    return flatten(stage.config.model_dump(mode="json"))


def _swap(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` so that a reader sees either the old or the new output."""
    trash = None
    if final.exists():
        trash = final.parent / ".tmp" / f"trash-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
