"""Financial PhraseBank (Malo et al. 2014), 3-class sentence sentiment, as FinBERT (Araci
2019) evaluates it. The set has no official split; this one is fixed and documented: a
permutation seeded with 0, 20% of all sentences for test, 20% of the rest for validation,
the remaining 64% for training (FinBERT's proportions)."""

from __future__ import annotations

from pathlib import Path

from factory.bench.classify import TextExample
from factory.bench.data import TaskData, read_csv, split_fractions
from factory.stage import UserError

LABELS = ["negative", "neutral", "positive"]


def load_phrasebank(folder: Path) -> TaskData:
    """`all-data.csv` (or any Sentences_*.csv) with rows `label,sentence`; a header line
    `label,...` is skipped; latin-1 (the original release) is read too."""
    folder = Path(folder)
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise UserError(f"{folder}: no .csv file (expected all-data.csv: label,sentence)")
    rows = read_csv(files[0])
    if rows and rows[0][0].strip().lower() == "label":
        rows = rows[1:]
    examples = []
    for n, r in enumerate(rows, 1):
        label = r[0].strip().lower() if r else ""
        if label not in LABELS or len(r) < 2:
            raise UserError(f"{files[0]}: row {n}: expected `label,sentence` with label "
                            f"{'/'.join(LABELS)}")
        examples.append(TextExample(",".join(r[1:]), LABELS.index(label)))
    train, dev, test = split_fractions(len(examples), 0.2, 0.2)
    return TaskData([examples[i] for i in train], [examples[i] for i in test], LABELS,
                    [examples[i] for i in dev],
                    note="seeded split (seed 0): test 20%, validation 20% of the rest")
