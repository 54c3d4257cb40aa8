"""`factory corpus prepare`: the corpus stage without a manifest or a held-out split.

Each --input becomes a source (`input`, or `input0`, `input1`, ... for several); kept
documents go to <output>/<source>/<rank>.jsonl.gz with their original fields; the report is
factory.corpus.report.prepare_report of the stage's stats.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from factory.stage import MemoryLog, StageContext, UserError

if TYPE_CHECKING:
    from factory.corpus.options import NearDedup

logger = logging.getLogger(__name__)


def _test_ref(path: Path):
    from factory.corpus.stage import BenchmarkText

    p = path.resolve()
    if p.is_dir():
        kind = "ner"
    elif p.suffix.lower() in (".tsv", ".iob", ".conll"):
        kind = "iob"
    else:
        kind = "text"
    return BenchmarkText(task=p.name if p.is_dir() else p.stem, kind=kind, path=str(p))


def prepare_corpus(inputs: list[str], output: Path, *, text_field: str = "text",
                   near_dedup: bool | NearDedup = False, exact_dedup: bool = True,
                   decontaminate: list[Path] = (), ngram: int = 13, min_words: int = 5,
                   languages: list[str] = (), tasks: int | None = None,
                   report: Path | None = None) -> dict:
    """Runs the cleaning pipeline; returns (and writes, when asked) the report."""
    from factory.corpus.options import Executor, Filters, Language, NearDedup
    from factory.corpus.report import prepare_report
    from factory.corpus.stage import (
        CorpusConfig,
        CorpusStage,
        DecontaminateConfig,
        SourceConfig,
    )

    if not inputs:
        raise UserError("factory corpus prepare: give at least one --input FILE_OR_GLOB")
    filters = Filters(language=Language(languages=list(languages))) if languages else Filters()
    names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    sources = [SourceConfig(name=n, path=str(Path(p).expanduser().absolute()),
                            text_field=text_field, filters=filters)
               for n, p in zip(names, inputs)]
    decon = (DecontaminateConfig(tests=[_test_ref(Path(p)) for p in decontaminate], ngram=ngram)
             if decontaminate else None)
    config = CorpusConfig(sources=sources, heldout_fraction=0.0, min_words=min_words,
                          exact_dedup=exact_dedup,
                          near_dedup=(near_dedup if isinstance(near_dedup, NearDedup)
                                      else NearDedup() if near_dedup else None),
                          decontaminate=decon, executor=Executor(tasks=tasks),
                          train_dir="{source}", require_heldout=False)
    stage = CorpusStage(config)
    problems = stage.check()
    if problems:
        raise UserError(problems[0].replace("corpus.sources[", "--input[")
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    output.mkdir(parents=True, exist_ok=True)
    stage.run(StageContext(out=output, inputs={}, log=MemoryLog()))
    stats = json.loads((output / "stats.json").read_text(encoding="utf-8"))
    rep = prepare_report(stats)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
    logger.info("corpus prepare: %d documents kept in %s", rep["kept"], output)
    return rep
