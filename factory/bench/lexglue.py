"""LexGLUE loaders (Chalkidis et al. 2022): CaseHOLD (multiple choice) and UNFAIR-ToS
(multi-label).

Full LexGLUE folders hold `train.jsonl`, `validation.jsonl`, `test.jsonl` (the fields of the
Hugging Face `lex_glue` configs: CaseHOLD {context, endings, label}, UNFAIR-ToS {text, labels}
with label ids). A folder with a single `*.jsonl` (the 1,000-question test samples here) has no
training split: it is cross-validated in 5 folds (fixed seeded assignment, `data.kfold`), every
question predicted once by a model that never saw it, and scored over all of them.
UNFAIR-ToS labels may be ids or names; ids index LexGLUE's label order below.
"""

from __future__ import annotations

from pathlib import Path

from factory.bench.classify import ChoiceExample, TextExample
from factory.bench.data import TaskData, first_file, read_jsonl
from factory.stage import UserError

FOLDS = 5
# LexGLUE's UNFAIR-ToS label order (the `lex_glue` dataset's ClassLabel names).
UNFAIR_TOS_LABELS = ["Limitation of liability", "Unilateral termination", "Unilateral change",
                     "Content removal", "Contract by using", "Choice of law", "Jurisdiction",
                     "Arbitration"]


def _splits(folder: Path) -> tuple[Path | None, Path]:
    """(train file or None, test file)."""
    folder = Path(folder)
    train = first_file(folder, "train.jsonl", "train.json")
    test = first_file(folder, "test.jsonl", "test.json")
    if train and test:
        return train, test
    files = sorted(folder.glob("*.jsonl"))
    if len(files) != 1:
        raise UserError(f"{folder}: expected train.jsonl + test.jsonl, or a single *.jsonl "
                        f"to cross-validate (found {len(files)} .jsonl files)")
    return None, files[0]


def _casehold(path: Path) -> list[ChoiceExample]:
    out = []
    for n, r in enumerate(read_jsonl(path), 1):
        try:
            out.append(ChoiceExample(str(r["context"]), tuple(str(e) for e in r["endings"]),
                                     int(r["label"])))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}:{n}: expected {{context, endings, label}}") from None
        if not 0 <= out[-1].label < len(out[-1].endings):
            raise UserError(f"{path}:{n}: label {out[-1].label} is not an ending's index")
    return out


def load_casehold(folder: Path) -> TaskData:
    train, test = _splits(folder)
    if train is None:
        return TaskData([], _casehold(test), folds=FOLDS,
                        note=f"{test.name}: {FOLDS}-fold cross-validation")
    return TaskData(_casehold(train), _casehold(test))


def _unfair(path: Path) -> list[TextExample]:
    out = []
    for n, r in enumerate(read_jsonl(path), 1):
        ids = []
        for lab in r.get("labels", []):
            if isinstance(lab, int) and 0 <= lab < len(UNFAIR_TOS_LABELS):
                ids.append(lab)
            elif lab in UNFAIR_TOS_LABELS:
                ids.append(UNFAIR_TOS_LABELS.index(lab))
            else:
                raise UserError(f"{path}:{n}: unknown UNFAIR-ToS label {lab!r}")
        if "text" not in r:
            raise UserError(f"{path}:{n}: no `text` field")
        out.append(TextExample(str(r["text"]), tuple(sorted(set(ids)))))
    return out


def load_unfair_tos(folder: Path) -> TaskData:
    train, test = _splits(folder)
    if train is None:
        return TaskData([], _unfair(test), list(UNFAIR_TOS_LABELS), folds=FOLDS,
                        note=f"{test.name}: {FOLDS}-fold cross-validation")
    return TaskData(_unfair(train), _unfair(test), list(UNFAIR_TOS_LABELS))
