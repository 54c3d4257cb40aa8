"""Maltese loaders, the sets BERTu was evaluated on (Micallef et al. 2022): MUDT (CoNLL-U,
UPOS tagging as token classification) and the binary sentiment set (label,text CSV)."""

from __future__ import annotations

from pathlib import Path

from factory.bench.classify import TextExample
from factory.bench.data import TaskData, read_csv
from factory.bench.ner import IobSplit
from factory.stage import UserError

SENTIMENT_LABELS = ["negative", "positive"]


def read_conllu(path: Path, column: int = 3) -> IobSplit:
    """Words and one annotation column per sentence (3 = UPOS, 4 = XPOS). Multi-word token
    ranges (`1-2`) and empty nodes (`1.1`) are skipped: UPOS belongs to syntactic words."""
    words: list[str] = []
    tags: list[str] = []
    tokens: list[list[str]] = []
    all_tags: list[list[str]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__})") from None
    for n, line in enumerate(lines + [""], 1):
        if not line.strip():
            if words:
                tokens.append(words)
                all_tags.append(tags)
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise UserError(f"{path}:{n}: a CoNLL-U line has 10 tab-separated columns, "
                            f"this one {len(cols)}")
        if not cols[0].isdigit():
            continue
        words.append(cols[1])
        tags.append(cols[column])
    if not tokens:
        raise UserError(f"{path}: no sentences")
    return IobSplit(tokens, all_tags)


def _conllu_file(folder: Path, split: str) -> Path:
    hits = sorted(Path(folder).glob(f"*-ud-{split}.conllu"))
    if not hits:
        raise UserError(f"{folder}: no *-ud-{split}.conllu")
    return hits[0]


def load_upos(folder: Path) -> TaskData:
    train = read_conllu(_conllu_file(folder, "train"))
    test = read_conllu(_conllu_file(folder, "test"))
    labels = sorted({t for s in train.tags + test.tags for t in s})
    return TaskData(train, test, labels, read_conllu(_conllu_file(folder, "dev")))


def _sentiment(path: Path) -> list[TextExample]:
    rows = read_csv(path)
    if rows and rows[0][0].strip().lower() == "label":
        rows = rows[1:]
    out = []
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or r[0].strip() not in ("0", "1"):
            raise UserError(f"{path}: row {n}: expected `label,text` with label 0 or 1")
        out.append(TextExample(",".join(r[1:]), int(r[0])))
    return out


def load_sentiment(folder: Path) -> TaskData:
    folder = Path(folder)
    return TaskData(_sentiment(folder / "train.csv"), _sentiment(folder / "test.csv"),
                    SENTIMENT_LABELS, _sentiment(folder / "dev.csv")
                    if (folder / "dev.csv").is_file() else None)
