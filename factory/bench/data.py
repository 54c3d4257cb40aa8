"""What every loader returns, and the file helpers they share.

A loader takes one task folder and returns a `TaskData`. Sets that ship without a training
split (the 1,000-question CaseHOLD sample, the CoSQA dev set, ...) come back with `folds`
set: the runner then cross-validates over `test` (see `kfold`).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory.stage import UserError

KFOLD_SEED = 0          # the fold assignment never changes with the fine-tuning seed


@dataclass
class TaskData:
    """train/test examples (an IobSplit for tagging tasks, a list otherwise) and the label
    names (class names, tags; empty for regression and cloze)."""

    train: Any
    test: Any
    labels: list[str] = field(default_factory=list)
    devel: Any = None
    folds: int | None = None      # k-fold cross-validation over `test` (train is empty)
    note: str = ""                # how the split was made, for the report


def _norm(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


def find_task_folder(data_dir: Path, prefixes: tuple[str, ...]) -> Path | None:
    """The sub-folder of data_dir whose name starts with one of the prefixes (case, `-` and
    `_` ignored): `BC2GM-IOB/` is found for `BC2GM`. None when there is none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    wanted = [_norm(p) for p in prefixes]
    hits = sorted(d for d in data_dir.iterdir()
                  if d.is_dir() and any(_norm(d.name).startswith(w) for w in wanted))
    return hits[0] if hits else None


def first_file(folder: Path, *names: str) -> Path | None:
    """The first of `names` that exists in folder (splits come as dev.tsv or devel.tsv...)."""
    for n in names:
        if (Path(folder) / n).is_file():
            return Path(folder) / n
    return None


def need_file(folder: Path, *names: str) -> Path:
    p = first_file(folder, *names)
    if p is None:
        raise UserError(f"{folder}: no {' or '.join(names)}")
    return p


def read_tsv(path: Path, header: bool = True) -> list[dict[str, str]] | list[list[str]]:
    """Rows of a tab-separated file without quoting (sentences keep their quotes)."""
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if not header:
        return rows
    if not rows:
        raise UserError(f"{path}: empty (expected a header line)")
    names = rows[0]
    out = []
    for n, r in enumerate(rows[1:], 2):
        if len(r) != len(names):
            raise UserError(f"{path}:{n}: {len(r)} columns, the header has {len(names)}")
        out.append(dict(zip(names, r)))
    return out


def column(row: dict[str, str], path: Path, *names: str) -> str:
    for n in names:
        if n in row:
            return row[n]
    raise UserError(f"{path}: no column {' or '.join(names)} (has {', '.join(row)})")


def read_csv(path: Path, encodings: tuple[str, ...] = ("utf-8", "latin-1")) -> list[list[str]]:
    """Rows of a comma-separated file with double-quote quoting; tries each encoding."""
    for enc in encodings:
        try:
            with open(path, encoding=enc, newline="") as f:
                return [r for r in csv.reader(f) if r]
        except UnicodeDecodeError:
            continue
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e})") from None
    raise UserError(f"{path}: not {' or '.join(encodings)} text")


def read_jsonl(path: Path) -> Iterator[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{n}: not a JSON object per line") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e.__class__.__name__}: {e})") from None


def kfold(n: int, k: int, seed: int = KFOLD_SEED) -> list[np.ndarray]:
    """k disjoint test folds covering 0..n-1: a seeded permutation cut into k near-equal
    parts (the first n % k folds one longer)."""
    if not 2 <= k <= n:
        raise ValueError(f"cannot make {k} folds of {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, k)]


def split_fractions(n: int, test: float, dev: float, seed: int = KFOLD_SEED
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, dev, test) indices: a seeded permutation; `test` of all, then `dev` of the
    rest (FinBERT's 20% / 20%-of-the-remainder scheme)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(test * n)
    n_dev = round(dev * (n - n_test))
    return (np.sort(perm[n_test + n_dev:]), np.sort(perm[n_test:n_test + n_dev]),
            np.sort(perm[:n_test]))
