"""CodeXGLUE loaders (Lu et al. 2021): ClozeTest-maxmin (zero-shot) and CoSQA relevance.

Cloze: `clozeTest_<lang>.json` (or `<lang>/clozeTest.json`), items {idx, nl_tokens,
pl_tokens} with one `<mask>` in pl_tokens. The answers ship separately in CodeXGLUE
(`evaluator/answers/<lang>/answers.txt`, lines `idx<CODESPLIT>word`); the loader looks for
`answers_<lang>.txt` or `<lang>/answers.txt` beside the questions.
CoSQA: `cosqa-dev.json` (a list of {doc, code, label}), or train/dev/test of the same form;
with only the dev file (as here) it is cross-validated in 5 folds.
"""

from __future__ import annotations

from pathlib import Path

from factory.bench.classify import TextExample
from factory.bench.cloze import MASK, ClozeExample
from factory.bench.data import TaskData, first_file, read_json
from factory.stage import UserError

FOLDS = 5
RELEVANCE_LABELS = ["irrelevant", "relevant"]


def load_cloze(folder: Path, lang: str) -> TaskData:
    folder = Path(folder)
    questions = first_file(folder, f"clozeTest_{lang}.json", f"{lang}/clozeTest.json")
    answers = first_file(folder, f"answers_{lang}.txt", f"{lang}/answers.txt")
    if questions is None:
        raise UserError(f"{folder}: no clozeTest_{lang}.json")
    if answers is None:
        raise UserError(f"{folder}: no answers_{lang}.txt (CodeXGLUE keeps the answers in "
                        f"evaluator/answers/{lang}/answers.txt: copy it there)")
    gold = {}
    for n, line in enumerate(answers.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            idx, sep, word = line.partition("<CODESPLIT>")
            if not sep:
                raise UserError(f"{answers}:{n}: expected idx<CODESPLIT>word")
            gold[idx.strip()] = word.strip()
    out = []
    for item in read_json(questions):
        code = item["pl_tokens"]
        if code.count(MASK) != 1 or item["idx"] not in gold:
            raise UserError(f"{questions}: item {item.get('idx')} needs one {MASK} and an "
                            f"answer in {answers.name}")
        at = code.index(MASK)
        out.append(ClozeExample(" ".join(item["nl_tokens"] + code[:at]),
                                " ".join(code[at + 1:]), gold[item["idx"]]))
    return TaskData([], out)


def _cosqa(path: Path) -> list[TextExample]:
    items = read_json(path)
    try:
        return [TextExample(str(x["doc"]), int(x["label"]), pair=str(x["code"]),
                            group=str(x.get("idx", i))) for i, x in enumerate(items)]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: expected a list of {{doc, code, label}}") from None


def load_cosqa(folder: Path) -> TaskData:
    folder = Path(folder)
    train = first_file(folder, "cosqa-train.json", "train.json")
    test = first_file(folder, "cosqa-test.json", "test.json")
    if train and test:
        return TaskData(_cosqa(train), _cosqa(test), RELEVANCE_LABELS)
    dev = first_file(folder, "cosqa-dev.json", "dev.json")
    if dev is None:
        raise UserError(f"{folder}: no cosqa-dev.json (or cosqa-train.json + cosqa-test.json)")
    return TaskData([], _cosqa(dev), RELEVANCE_LABELS, folds=FOLDS,
                    note=f"{dev.name}: {FOLDS}-fold cross-validation")
