"""What every stage is: a typed config plus a `run`.

A stage reads only its config and the output folders of the stages it depends on, and
writes only into `ctx.out` (a temporary folder the runner renames on success). The runner
hashes the config, so everything that changes a stage's output must be in its config.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from factory.manifest import Loaded


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserError(Exception):
    """A mistake of the user's (bad file, field, checkpoint): printed as one line, exit 2."""


class StageLog(Protocol):
    """Where a stage sends numbers and files; MLflow in a factory run (factory/tracking.py)."""

    def metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def params(self, values: dict[str, Any]) -> None: ...


class MemoryLog:
    """A StageLog that keeps everything in memory: stage tests and library use."""

    def __init__(self) -> None:
        self.history: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.param_values: dict[str, Any] = {}

    def metrics(self, values, step=None):
        self.history.append((step, dict(values)))

    def artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))

    def params(self, values):
        self.param_values.update(values)


@dataclass
class StageContext:
    out: Path                                  # write here; renamed to the final folder on success
    inputs: dict[str, Path]                    # upstream stage name -> its final output folder
    log: StageLog = field(default_factory=MemoryLog)
    progress: "Progress | None" = None

    def track(self, total: int | None, description: str) -> contextlib.AbstractContextManager:
        """A progress bar (rich) when the runner has one, else a no-op counter."""
        if self.progress is None:
            return contextlib.nullcontext(_NullTask())
        return self.progress.task(total, description)


class _NullTask:
    def advance(self, n: float = 1, **fields: Any) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


class Progress:
    """Thin wrapper over rich.progress so stages need not know about the console."""

    def __init__(self, rich_progress) -> None:
        self._p = rich_progress

    @contextlib.contextmanager
    def task(self, total: int | None, description: str) -> Iterator[Any]:
        tid = self._p.add_task(description, total=total, info="")
        p = self._p

        class _Task:
            def advance(self, n: float = 1, **fields: Any) -> None:
                info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in fields.items())
                p.update(tid, advance=n, **({"info": info} if fields else {}))

            def update(self, **fields: Any) -> None:
                p.update(tid, **fields)

        try:
            yield _Task()
        finally:
            p.update(tid, visible=False)
            p.remove_task(tid)


class Stage(ABC):
    """A stage of a factory run."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]

    def __init__(self, config: StageConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def from_manifest(cls, loaded: "Loaded") -> "Stage":
        """This stage's config, taken from the resolved manifest."""

    def check(self) -> list[str]:
        """Problems found before any work starts (missing files, bad checkpoints): one line each."""
        return []

    def fingerprint(self) -> dict[str, str]:
        """Content hashes of the files the config names, folded into the cache key."""
        return {}

    @abstractmethod
    def run(self, ctx: StageContext) -> dict[str, float]:
        """Do the work into ctx.out; return the stage's headline metrics."""
