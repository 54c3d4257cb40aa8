"""The evaluate stage: held-out loss against a unigram floor, each NER task against its own
floor (a training-set dictionary tagger), and the manifest's benchmark suites
(factory.bench.runner) against the published scores.

Reads export/hf (the Hugging Face model folder), corpus/heldout/*.jsonl.gz and
pack/{unigram_counts.npy,pack.json}; writes results.json:
    {"heldout": {"heldout_loss", "heldout_unigram_loss", "heldout_tokens", "heldout_docs"},
     "tasks": {name: {"metric": "entity_f1", "f1", "precision", "recall", "dictionary_f1",
                      "n_train", "n_test", ...}},
     "suites": {suite: the runner's results (tasks, groups, score, score_partial, ...)}}
and for each suite bench_<suite>.json and bench_<suite>.md (the table beside the published
scores).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from factory.bench.session import Tracks as _Tracks
from factory.bench.session import headline_metrics
from factory.hashing import file_digest
from factory.manifest import SuiteRun, Task
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

log = logging.getLogger(__name__)

NER_FILES = ("train.tsv", "test.tsv")   # devel.tsv is not used: no model selection yet


class EvaluateStage(Stage):
    name = "evaluate"

    class Config(StageConfig):
        family: Literal["bert", "gpt"]
        seq_length: int = Field(gt=0, description="Training sequence length: held-out chunks")
        heldout_loss: bool = True
        heldout_max_docs: int | None = Field(1000, gt=0)
        tasks: list[Task] = Field(default_factory=list,
                                  description="The manifest's tasks, `data` made absolute")
        suites: list[SuiteRun] = Field(default_factory=list,
                                       description="The manifest's suites, `data` absolute")

    @classmethod
    def from_manifest(cls, loaded: Loaded) -> EvaluateStage:
        m = loaded.manifest
        ev = m.evaluation
        tasks = [t.model_copy(update={"data": str(loaded.resolve(t.data))}) for t in ev.tasks]
        suites = [s.model_copy(update={"data": str(_suite_dir(s, loaded))}) for s in ev.suites]
        return cls(cls.Config(family=m.family, seq_length=m.training.seq_length,
                              heldout_loss=ev.heldout_loss,
                              heldout_max_docs=ev.heldout_max_docs, tasks=tasks,
                              suites=suites))

    def check(self) -> list[str]:
        problems = []
        for t in self.config.tasks:
            folder = Path(t.data)
            if not folder.is_dir():
                problems.append(f"evaluation.tasks {t.name}: data folder {folder} does not exist "
                                "(point `data` at a folder with train.tsv and test.tsv)")
                continue
            missing = [f for f in NER_FILES if not (folder / f).is_file()]
            if missing:
                problems.append(f"evaluation.tasks {t.name}: {folder} has no "
                                f"{' or '.join(missing)} (an IOB folder needs train.tsv and "
                                "test.tsv: token<TAB>tag lines)")
        for i, s in enumerate(self.config.suites):
            folders = _suite_folders(s)
            if folders is None:
                problems.append(f"evaluation.suites.{i} ({s.suite}): data folder {s.data} does "
                                "not exist (point `data` at a folder with one sub-folder per "
                                "task)")
                continue
            missing = [n for n, f in folders.items() if f is None]
            if s.tasks and missing:
                problems.append(f"evaluation.suites.{i} ({s.suite}): no folder for "
                                f"{', '.join(missing)} under {s.data} (a sub-folder whose name "
                                "starts with the task name)")
            elif len(missing) == len(folders):
                problems.append(f"evaluation.suites.{i} ({s.suite}): no task data under "
                                f"{s.data}")
        return problems

    def fingerprint(self) -> dict[str, str]:
        out = {}
        for t in self.config.tasks:
            for f in NER_FILES:
                p = Path(t.data) / f
                if p.is_file():
                    out[f"{t.name}/{f}"] = file_digest([p])
        for s in self.config.suites:
            for name, folder in (_suite_folders(s) or {}).items():
                if folder is not None:
                    files = sorted(p for p in folder.rglob("*") if p.is_file())
                    out[f"{s.suite}/{name}"] = file_digest(files)
        return out

    def run(self, ctx: StageContext) -> dict[str, float]:
        cfg = self.config
        hf = Path(ctx.inputs["export"]) / "hf"
        if not (hf / "config.json").is_file():
            raise UserError(f"{hf}: no config.json (the export stage's Hugging Face folder); "
                            "rerun the export stage")
        results: dict = {"heldout": {}, "tasks": {}}
        metrics: dict[str, float] = {}

        if cfg.heldout_loss:
            results["heldout"] = self._heldout(ctx, hf)
            metrics["heldout_loss"] = results["heldout"]["heldout_loss"]
            metrics["heldout_unigram_loss"] = results["heldout"]["heldout_unigram_loss"]
            ctx.log.metrics(metrics)

        for task in cfg.tasks:
            r = self._ner(ctx, hf, task)
            results["tasks"][task.name] = r
            for k in ("f1", "precision", "recall", "dictionary_f1"):
                metrics[f"{task.name}_{k}"] = r[k]
            ctx.log.metrics({f"{task.name}_{k}": r[k] for k in
                             ("f1", "precision", "recall", "dictionary_f1")})

        if cfg.suites:
            results["suites"] = {}
        for s in cfg.suites:
            r = self._suite(ctx, hf, s)
            results["suites"][s.suite] = r
            metrics.update(headline_metrics(r))

        path = Path(ctx.out) / "results.json"
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        ctx.log.artifact(path)
        return metrics

    def _heldout(self, ctx: StageContext, hf: Path) -> dict:
        import numpy as np

        from factory.bench.heldout import heldout_loss, read_documents

        pack = Path(ctx.inputs["pack"])
        files = sorted((Path(ctx.inputs["corpus"]) / "heldout").glob("*.jsonl.gz"))
        if not files:
            raise UserError(f"{Path(ctx.inputs['corpus']) / 'heldout'}: no *.jsonl.gz held-out "
                            "documents; rerun the corpus stage or set "
                            "evaluation.heldout_loss: false")
        try:
            info = json.loads((pack / "pack.json").read_text(encoding="utf-8"))
            counts = np.load(pack / "unigram_counts.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{pack}: cannot read pack.json / unigram_counts.npy "
                            f"({e.__class__.__name__}); rerun the pack stage") from None
        if info.get("family", self.config.family) != self.config.family:
            raise UserError(f"{pack / 'pack.json'}: packed for family {info.get('family')!r}, "
                            f"the manifest says {self.config.family!r}; rerun the pack stage")
        texts = read_documents(files, self.config.heldout_max_docs)
        if not texts:
            raise UserError(f"{files[0].parent}: the held-out files hold no documents with text")
        with _Tracks(ctx, "heldout") as track:
            r = heldout_loss(hf, texts, self.config.family, self.config.seq_length, counts,
                             eod_id=info.get("eod_id") if self.config.family == "gpt" else None,
                             progress=track)
        r["heldout_docs"] = float(len(texts))
        return r

    def _ner(self, ctx: StageContext, hf: Path, task: Task) -> dict:
        from factory.bench.dictionary import dictionary_baseline
        from factory.bench.ner import NerData, NerOptions, finetune_ner

        data = NerData.load(Path(task.data))
        options = NerOptions(**task.model_dump(include=set(NerOptions.model_fields)))
        train = data.train.head(options.max_train_sentences)
        test = data.test.head(options.max_test_sentences)
        floor = dictionary_baseline(train, test)
        log.info("%s: dictionary baseline F1 %.2f", task.name, floor["f1"])
        with _Tracks(ctx, task.name) as track:
            r = finetune_ner(hf, data, options, progress=track)
        return {"metric": "entity_f1", "f1": r.f1, "precision": r.precision,
                "recall": r.recall, "dictionary_f1": floor["f1"],
                "dictionary_precision": floor["precision"],
                "dictionary_recall": floor["recall"], "n_train": r.n_train,
                "n_test": r.n_test, "train_loss": r.train_loss,
                "truncated_test_words": r.truncated_words, "seconds": r.seconds}

    def _suite(self, ctx: StageContext, hf: Path, s: SuiteRun) -> dict:
        from factory.bench.session import run_and_record

        overrides = {k: getattr(s, k) for k in ("epochs", "lr", "batch_size", "max_seq_length")
                     if getattr(s, k) is not None}
        r = run_and_record(ctx, hf, s.suite, stem=f"bench_{s.suite}", tasks=s.tasks,
                           data_dir=Path(s.data), seeds=s.seeds,
                           max_train_examples=s.max_train_examples,
                           max_test_examples=s.max_test_examples, overrides=overrides)
        r.pop("markdown")
        return r


def _suite_dir(s: SuiteRun, loaded: Loaded) -> Path:
    from factory.bench.suites import SUITES

    return loaded.resolve(s.data) if s.data is not None else SUITES[s.suite].data_dir


def _suite_folders(s: SuiteRun) -> dict[str, Path | None] | None:
    """Each selected task's folder (None when absent); None when the data folder is."""
    from factory.bench.runner import get_suite, locate, select_tasks

    if s.data is None or not Path(s.data).is_dir():
        return None
    suite = get_suite(s.suite)
    return locate(suite, select_tasks(suite, s.tasks), Path(s.data))
