"""Stage graphs a manifest can name, as data (one YAML file per strategy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import yaml


@dataclass(frozen=True)
class StageRef:
    name: str
    inputs: tuple[str, ...] = ()
    register: str | None = None   # an output subfolder registered in the MLflow Model Registry


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[StageRef, ...] = field(default_factory=tuple)


def load(name: str) -> Pipeline:
    text = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    refs = tuple(StageRef(s["name"], tuple(s.get("inputs", ())), s.get("register"))
                 for s in raw["stages"])
    seen: set[str] = set()
    for r in refs:
        missing = [i for i in r.inputs if i not in seen]
        if missing:
            raise ValueError(f"pipeline {name}: stage {r.name} reads {missing} before they run")
        seen.add(r.name)
    return Pipeline(name, refs)
