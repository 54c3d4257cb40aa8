"""MLflow: the only module that imports it.

One parent run per `factory run`, one nested run per stage. Step metrics are buffered and
sent in batches (a SQLite store costs a transaction per call). The default store is a SQLite
file under the runs root; MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 5.0
FLUSH_EVERY_N = 200


def runs_root() -> Path:
    """Where run directories and the default MLflow store live (FACTORY_RUNS_ROOT or ./runs)."""
    return Path(os.environ.get("FACTORY_RUNS_ROOT", "runs")).resolve()


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = root or runs_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    return ((root or runs_root()) / "mlartifacts").as_uri()


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """A nested manifest as MLflow params: dotted keys, lists indexed, values as text."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and any(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(d)[:6000]
    return out


class StageRun:
    """A nested MLflow run for one stage; implements factory.stage.StageLog."""

    def __init__(self, tracker: "Tracker", run_id: str):
        self._t = tracker
        self.run_id = run_id
        self._buf: list = []
        self._last = time.monotonic()

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in values.items():
            if v is None:
                continue
            self._buf.append(Metric(_key(k), float(v), ts, int(step or 0)))
        if len(self._buf) >= FLUSH_EVERY_N or time.monotonic() - self._last > FLUSH_EVERY_S:
            self.flush()

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._t.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self._t.client.log_artifact(self.run_id, str(path), artifact_path)

    def params(self, values: dict[str, Any]) -> None:
        self._t.log_params(self.run_id, values)

    def tags(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self._t.client.set_tag(self.run_id, k, v)

    def flush(self) -> None:
        self._last = time.monotonic()
        while self._buf:
            chunk, self._buf = self._buf[:1000], self._buf[1000:]
            self._t.client.log_batch(self.run_id, metrics=chunk)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._t.client.set_terminated(self.run_id, status=status)

    @property
    def artifact_uri(self) -> str:
        return self._t.client.get_run(self.run_id).info.artifact_uri


def _key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


class Tracker:
    def __init__(self, experiment: str, uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri or tracking_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            loc = artifact_root() if self.uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc)
        else:
            self.experiment_id = exp.experiment_id
        self.experiment = experiment

    def start_parent(self, name: str, tags: dict[str, str]) -> StageRun:
        self._close_stale(tags.get("factory.run_dir"))
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return StageRun(self, run.info.run_id)

    def continue_parent(self, run_id: str) -> StageRun | None:
        """Reopen an earlier parent run of this experiment (the next command of one launched
        job); None when the store does not hold it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != self.experiment_id:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return StageRun(self, run_id)

    def start_child(self, parent: StageRun, name: str, tags: dict[str, str]) -> StageRun:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": parent.run_id, **tags})
        return StageRun(self, run.info.run_id)

    def log_params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_key(k)[:250], str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def register_model(self, name: str, run: StageRun, artifact_path: str) -> int:
        """A new version of registered model `name` whose source is the run's artifact."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        mv = self.client.create_model_version(
            name, source=f"{run.artifact_uri}/{artifact_path}", run_id=run.run_id)
        return int(mv.version)

    def _close_stale(self, run_dir: str | None) -> None:
        """Runs of this run directory still RUNNING belong to a killed process: mark them."""
        if not run_dir:
            return
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`factory.run_dir` = '{run_dir}' and attributes.status = 'RUNNING'")
        for r in stale:
            for child in self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{r.info.run_id}' "
                                  "and attributes.status = 'RUNNING'"):
                self.client.set_terminated(child.info.run_id, status="KILLED")
            self.client.set_terminated(r.info.run_id, status="KILLED")


def ui_command(host: str, port: int) -> list[str]:
    """The `mlflow ui` command line over the default store."""
    uri = tracking_uri()
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", artifact_root()]
    return cmd
