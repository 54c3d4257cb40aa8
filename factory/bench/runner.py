"""Run a suite's tasks over seeds on one model folder; aggregate into results.json's shape.

    {"suite", "model", "tasks": {TASK: {"metric", "mean", "std", "seeds", "values", "extra",
     "n_train", "n_test", ...}}, "groups": {type: mean}, "score", "score_partial", "missing"}

Every number is in percent (Pearson x 100). std is the sample standard deviation over seeds
(0 for one seed). The suite score is the macro average of the task-type averages (BLURB's
rule; for suites with one task per type it is the plain mean); when a task's data is missing
the score covers the types present and `score_partial` is true.
Cross-validated sets (folds) train one model per fold and score the pooled predictions.
Zero-shot tasks (cloze) do not depend on the seed: they run once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.bench.data import TaskData, find_task_folder, kfold
from factory.bench.finetune import FinetuneOptions, ProgressFn
from factory.bench.metrics import mean_std
from factory.bench.ner import IobSplit
from factory.bench.suites import SUITES, Suite, TaskSpec
from factory.stage import UserError

log = logging.getLogger(__name__)

# Names a task's progress callback: (task) -> ProgressFn or None.
ProgressFor = Callable[[str], ProgressFn | None]


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]


def select_tasks(suite: Suite, names: list[str] | None) -> list[TaskSpec]:
    """The named tasks (case-insensitive), or all of the suite's."""
    if not names:
        return list(suite.tasks.values())
    by_lower = {n.lower(): t for n, t in suite.tasks.items()}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise UserError(f"suite {suite.name} has no task {', '.join(unknown)}; its tasks: "
                        f"{', '.join(suite.tasks)}")
    return [by_lower[n.lower()] for n in names]


def locate(suite: Suite, tasks: list[TaskSpec], data_dir: Path | None
           ) -> dict[str, Path | None]:
    """The data folder of each task (None when absent)."""
    root = Path(data_dir) if data_dir is not None else suite.data_dir
    return {t.name: find_task_folder(root, t.prefixes) for t in tasks}


def _head(split: Any, n: int | None) -> Any:
    if n is None:
        return split
    return split.head(n) if isinstance(split, IobSplit) else split[:n]


def _take(split: Any, idx) -> Any:
    if isinstance(split, IobSplit):
        return IobSplit([split.tokens[i] for i in idx], [split.tags[i] for i in idx])
    return [split[i] for i in idx]


def predict_task(model_dir: Path, spec: TaskSpec, train: Any, test: Any, labels: list[str],
                 options: FinetuneOptions, progress: ProgressFn | None = None,
                 device: str | None = None) -> list:
    """Fine-tune the task's head on train (if any) and predict test."""
    from factory.bench import classify, cloze, ner

    if spec.kind == "cloze":
        return cloze.cloze_predict(model_dir, test, options.max_seq_length, progress, device)
    if not len(train):
        raise UserError(f"{spec.name}: no training examples")
    if spec.kind == "tag":
        return ner.finetune_tagger(model_dir, train, test, labels, options, progress,
                                   device).predictions
    if spec.kind == "choice":
        return classify.finetune_choice(model_dir, train, test, options, progress,
                                        device).values
    return classify.finetune_classifier(model_dir, train, test, spec.kind, len(labels),
                                        options, progress, device).values


def run_task(model_dir: Path, spec: TaskSpec, data: TaskData, seeds: list[int],
             options: FinetuneOptions, max_train: int | None = None,
             max_test: int | None = None, progress: ProgressFn | None = None,
             device: str | None = None) -> dict:
    """One task over all seeds: the results.json entry of the task."""
    start = time.perf_counter()
    test = _head(data.test, max_test)
    if spec.kind == "cloze":
        seeds = seeds[:1]
    per_seed: list[dict[str, float]] = []
    n_train = 0
    for seed in seeds:
        opts = options.model_copy(update={"seed": seed})
        if data.folds:
            preds: list = [None] * len(test)
            n_train = 0
            for fold in kfold(len(test), data.folds):
                held = set(fold.tolist())
                train = _head(_take(test, [i for i in range(len(test)) if i not in held]),
                              max_train)
                n_train = max(n_train, len(train))
                got = predict_task(model_dir, spec, train, _take(test, fold), data.labels,
                                   opts, progress, device)
                for i, p in zip(fold.tolist(), got):
                    preds[i] = p
        else:
            train = _head(data.train, max_train)
            n_train = len(train)
            preds = predict_task(model_dir, spec, train, test, data.labels, opts, progress,
                                 device)
        per_seed.append(spec.score(test, preds, data.labels))
        log.info("%s seed %d: %s %.2f", spec.name, seed, spec.metric,
                 per_seed[-1][spec.metric])
    values = [s[spec.metric] for s in per_seed]
    mean, std = mean_std(values)
    extra = {k: mean_std([s[k] for s in per_seed])[0] for k in per_seed[0] if k != spec.metric}
    return {"metric": spec.metric, "mean": mean, "std": std, "seeds": list(seeds),
            "values": values, "extra": extra, "n_train": n_train, "n_test": len(test),
            "group": spec.group, "folds": data.folds, "note": data.note,
            "options": options.model_dump(exclude={"seed"}),
            "seconds": time.perf_counter() - start}


def suite_score(suite: Suite, tasks: dict[str, dict]) -> tuple[float | None, dict[str, float]]:
    """Macro average of the task-type averages over the tasks present."""
    groups: dict[str, list[float]] = {}
    for r in tasks.values():
        groups.setdefault(r["group"], []).append(r["mean"])
    averages = {g: sum(v) / len(v) for g, v in groups.items()}
    score = sum(averages.values()) / len(averages) if averages else None
    return score, averages


def _options(spec: TaskSpec, overrides: dict[str, Any] | None) -> FinetuneOptions:
    """The task's defaults with the overrides, validated (a bad value is the user's)."""
    from pydantic import ValidationError

    try:
        return FinetuneOptions(**{**spec.defaults.model_dump(), **(overrides or {})})
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{spec.name}: fine-tuning option {'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}") from None


def run_suite(model_dir: Path, suite_name: str, *, tasks: list[str] | None = None,
              data_dir: Path | None = None, seeds: list[int] | tuple[int, ...] = (42,),
              max_train_examples: int | None = None, max_test_examples: int | None = None,
              overrides: dict[str, Any] | None = None, progress_for: ProgressFor | None = None,
              device: str | None = None) -> dict:
    """Evaluate model_dir on a suite. Tasks named in `tasks` must have data (UserError
    otherwise); of an unnamed full suite, tasks without data are listed as missing.

    overrides: FinetuneOptions fields (epochs, lr, batch_size, max_seq_length) applied to
    every task over its defaults.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    suite = get_suite(suite_name)
    chosen = select_tasks(suite, tasks)
    folders = locate(suite, chosen, data_dir)
    root = Path(data_dir) if data_dir is not None else suite.data_dir
    missing = [n for n, f in folders.items() if f is None]
    if tasks and missing:
        raise UserError(f"{root}: no data folder for {', '.join(missing)} (a folder whose name "
                        f"starts with the task name, e.g. {missing[0]}/)")
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    results: dict[str, dict] = {}
    for spec in chosen:
        folder = folders[spec.name]
        if folder is None:
            log.warning("%s/%s: no data under %s: left out of the score", suite.name,
                        spec.name, root)
            continue
        data = spec.load(folder)
        options = _options(spec, overrides)
        log.info("%s/%s from %s", suite.name, spec.name, folder)
        r = run_task(model_dir, spec, data, list(seeds), options, max_train_examples,
                     max_test_examples, progress_for(spec.name) if progress_for else None,
                     device)
        r["data"] = str(folder)
        results[spec.name] = r
    score, groups = suite_score(suite, results)
    all_missing = [n for n in suite.tasks if n not in results]
    return {"suite": suite.name, "model": str(model_dir), "tasks": results, "groups": groups,
            "score": score, "score_name": suite.score_name,
            "score_partial": bool(all_missing), "missing": all_missing}
