"""BLURB loaders (Gu et al. 2021, https://aka.ms/BLURB): one function per file layout.

Layouts read (each as BLURB's data-generation scripts write it, or in the set's own format):
- NER and PICO: `train.tsv`, `devel.tsv`/`dev.tsv`, `test.tsv`, `token<TAB>tag` lines.
- ChemProt, DDI, GAD: `train.tsv`, `dev.tsv`, `test.tsv` with header `index sentence label`
  (entities replaced by @GENE$/@DISEASE$/@CHEMICAL$...).
- HoC: the same TSVs, one row per sentence, labels `0_0,1_1,...` (hallmark_value) and
  index `PMID_sN`: sentences train and predict; the score is per abstract.
- BIOSSES: `train/dev/test.tsv` (or under `blurb_split/`) with sent1, sent2, score columns;
  a folder with only the original `biosses_all.tsv` (sentence1, sentence2, score_mean) is
  cross-validated in 5 folds.
- PubMedQA / BioASQ: the original `ori_pqal.json` with `pqal_blurb_split_pmids.json`
  (BLURB's fold-0 split), or BLURB's `train.json`/`dev.json`/`test.json`, each a dict
  id -> {QUESTION, CONTEXTS, final_decision}.
"""

from __future__ import annotations

from pathlib import Path

from factory.bench.classify import TextExample
from factory.bench.data import (
    TaskData,
    column,
    first_file,
    need_file,
    read_json,
    read_tsv,
)
from factory.bench.ner import NerData, label_list, read_iob
from factory.stage import UserError

DEV = ("devel.tsv", "dev.tsv")
QA_LABELS = ("yes", "no", "maybe")


def load_iob(folder: Path) -> TaskData:
    d = NerData.load(folder)
    return TaskData(d.train, d.test, d.labels, d.devel)


def load_pico(folder: Path) -> TaskData:
    """EBM-NLP as BLURB ships it: I-PAR/I-INT/I-OUT/O word tags."""
    train = read_iob(need_file(folder, "train.tsv"))
    test = read_iob(need_file(folder, "test.tsv"))
    dev = first_file(folder, *DEV)
    return TaskData(train, test, label_list(train, test), read_iob(dev) if dev else None)


def _relation_split(path: Path) -> tuple[list, list[str]]:
    rows = read_tsv(path)
    texts = [column(r, path, "sentence") for r in rows]
    labels = [column(r, path, "label") for r in rows]
    return list(zip(texts, labels, [column(r, path, "index") for r in rows])), labels


def load_relation(folder: Path) -> TaskData:
    """ChemProt, DDI, GAD: one sentence per candidate pair, one label each."""
    train_rows, train_labels = _relation_split(need_file(folder, "train.tsv"))
    test_rows, test_labels = _relation_split(need_file(folder, "test.tsv"))
    names = sorted(set(train_labels) | set(test_labels))
    ids = {n: i for i, n in enumerate(names)}

    def examples(rows):
        return [TextExample(t, ids[lab], group=i) for t, lab, i in rows]

    return TaskData(examples(train_rows), examples(test_rows), names)


HOC_LABELS = 10


def _hoc_split(path: Path) -> list[TextExample]:
    out = []
    for n, r in enumerate(read_tsv(path), 2):
        on = []
        for item in column(r, path, "labels").split(","):
            k, _, v = item.partition("_")
            if not (k.isdigit() and v in ("0", "1") and int(k) < HOC_LABELS):
                raise UserError(f"{path}:{n}: label {item!r} is not hallmark_value "
                                f"(hallmark 0-{HOC_LABELS - 1}, value 0/1)")
            if v == "1":
                on.append(int(k))
        index = column(r, path, "index")
        out.append(TextExample(column(r, path, "sentence"), tuple(sorted(on)),
                               group=index.rsplit("_s", 1)[0]))
    return out


def load_hoc(folder: Path) -> TaskData:
    return TaskData(_hoc_split(need_file(folder, "train.tsv")),
                    _hoc_split(need_file(folder, "test.tsv")),
                    [f"hallmark_{k}" for k in range(HOC_LABELS)])


def _pairs(path: Path) -> list[TextExample]:
    out = []
    for r in read_tsv(path):
        score = column(r, path, "score", "score_mean")
        try:
            value = float(score)
        except ValueError:
            raise UserError(f"{path}: score {score!r} is not a number") from None
        out.append(TextExample(column(r, path, "sent1", "sentence1"), value,
                               pair=column(r, path, "sent2", "sentence2"),
                               group=column(r, path, "pair_id", "id")))
    return out


def load_biosses(folder: Path) -> TaskData:
    folder = Path(folder)
    for base in (folder / "blurb_split", folder):
        if (base / "train.tsv").is_file() and (base / "test.tsv").is_file():
            return TaskData(_pairs(base / "train.tsv"), _pairs(base / "test.tsv"))
    everything = need_file(folder, "biosses_all.tsv")
    return TaskData([], _pairs(everything), folds=5,
                    note="no BLURB split: 5-fold cross-validation over biosses_all.tsv")


def _qa_examples(items: dict, ids: list[str], path: Path) -> list[TextExample]:
    out = []
    for i in ids:
        if i not in items:
            raise UserError(f"{path}: id {i} of the split is not in the question file")
        q = items[i]
        label = str(q.get("final_decision", "")).lower()
        if label not in QA_LABELS:
            raise UserError(f"{path}: question {i} has final_decision {label!r} "
                            f"(expected {'/'.join(QA_LABELS)})")
        contexts = q.get("CONTEXTS", [])
        context = " ".join(contexts) if isinstance(contexts, list) else str(contexts)
        out.append(TextExample(str(q.get("QUESTION", "")), QA_LABELS.index(label),
                               pair=context, group=i))
    return out


def load_yesno_qa(folder: Path) -> TaskData:
    """PubMedQA (yes/no/maybe) and BioASQ (yes/no) in the PubMedQA question format."""
    folder = Path(folder)
    if (folder / "ori_pqal.json").is_file():
        split_file = need_file(folder, "pqal_blurb_split_pmids.json")
        items = read_json(folder / "ori_pqal.json")
        split = read_json(split_file)
        train = _qa_examples(items, [str(i) for i in split["train"]], split_file)
        test = _qa_examples(items, [str(i) for i in split["test"]], split_file)
    else:
        train_file, test_file = need_file(folder, "train.json"), need_file(folder, "test.json")
        train_items, test_items = read_json(train_file), read_json(test_file)
        train = _qa_examples(train_items, list(train_items), train_file)
        test = _qa_examples(test_items, list(test_items), test_file)
    used = sorted({e.label for e in train + test})
    n = 3 if 2 in used else 2
    return TaskData(train, test, list(QA_LABELS[:n]))
