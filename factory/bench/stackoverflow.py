"""StackOverflow task loaders in the formats SOBert (He et al. 2024) evaluates on; no real
data is available here, so these are exercised by small fixtures only.

- Question quality (Kaggle "60k Stack Overflow Questions with Quality Rating"): `train.csv`
  and `valid.csv` with columns Id, Title, Body, Tags, CreationDate, Y; Y in HQ, LQ_EDIT,
  LQ_CLOSE. Input: title, then body.
- Closed-question prediction (Kaggle "Predict Closed Questions on Stack Overflow"):
  `train.csv` (and `test.csv`, else 5-fold cross-validation) with Title, BodyMarkdown,
  OpenStatus; OpenStatus in open, not a real question, not constructive, off topic,
  too localized.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from factory.bench.classify import TextExample
from factory.bench.data import TaskData, first_file
from factory.stage import UserError

QUALITY_LABELS = ["HQ", "LQ_EDIT", "LQ_CLOSE"]
CLOSED_LABELS = ["open", "not a real question", "not constructive", "off topic",
                 "too localized"]
FOLDS = 5


def _rows(path: Path, text: tuple[str, str], label: str, names: list[str]):
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*text, label) if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)}")
        out = []
        for n, r in enumerate(reader, 2):
            if r[label] not in names:
                raise UserError(f"{path}:{n}: {label} {r[label]!r} is not one of {names}")
            out.append(TextExample(r[text[0]], names.index(r[label]), pair=r[text[1]]))
    return out


def load_quality(folder: Path) -> TaskData:
    folder = Path(folder)
    train, test = first_file(folder, "train.csv"), first_file(folder, "valid.csv", "test.csv")
    if not (train and test):
        raise UserError(f"{folder}: needs train.csv and valid.csv (Id,Title,Body,Tags,"
                        "CreationDate,Y)")
    args = (("Title", "Body"), "Y", QUALITY_LABELS)
    return TaskData(_rows(train, *args), _rows(test, *args), QUALITY_LABELS)


def load_closed(folder: Path) -> TaskData:
    folder = Path(folder)
    train, test = first_file(folder, "train.csv"), first_file(folder, "test.csv")
    if train is None:
        raise UserError(f"{folder}: no train.csv (Title,BodyMarkdown,OpenStatus)")
    args = (("Title", "BodyMarkdown"), "OpenStatus", CLOSED_LABELS)
    if test is None:
        return TaskData([], _rows(train, *args), CLOSED_LABELS, folds=FOLDS,
                        note=f"train.csv only: {FOLDS}-fold cross-validation")
    return TaskData(_rows(train, *args), _rows(test, *args), CLOSED_LABELS)
