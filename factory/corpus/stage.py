"""The corpus stage: sources -> cleaned, deduplicated JSON Lines shards + a held-out split.

A datatrove pipeline on LocalPipelineExecutor, per source: counting reader (JSON Lines or a
streamed Hugging Face dataset) -> NormalizeText -> MinWordsFilter -> exact dedup (datatrove's
three steps: signatures, find duplicates, filter; over all sources and the held-out file
at once, held-out copies winning) -> HeldoutSplit -> JsonlWriter (gzip).

Output (the corpus/ contract): train/<source>/*.jsonl.gz, heldout/*.jsonl.gz, stats.json;
datatrove's logs and per-task stats under logs/.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

HELDOUT_NAME = "heldout"
STEPS = ("read", "normalize", "min_words", "exact_dedup", "heldout_split")


class HFDataset(StageConfig):
    id: str = Field(description="Hub id, or an absolute local dataset folder")
    split: str = "train"
    config: str | None = None


class SourceConfig(StageConfig):
    name: str
    path: str | None = Field(None, description="Absolute JSON Lines file or glob")
    hf_dataset: HFDataset | None = None
    text_field: str = "text"


class CorpusConfig(StageConfig):
    sources: list[SourceConfig]
    heldout: SourceConfig | None = None
    heldout_fraction: float = 0.01
    min_words: int = 5
    exact_dedup: bool = True
    split_seed: int = Field(0, description="Salt of the held-out hash; fixed so that every "
                            "training seed is evaluated on the same held-out documents")


def source_files(pattern: str) -> list[Path]:
    """The files a source path names: the file itself, or a glob's matches (sorted)."""
    if glob.has_magic(pattern):
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return [Path(pattern)] if os.path.isfile(pattern) else []


def _readable(path: Path) -> str | None:
    """None when the first line of `path` can be read, else why not."""
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rb") as f:
                f.readline()
        elif path.suffix == ".zst":
            import zstandard

            with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
                f.read(1)
        else:
            with open(path, "rb") as f:
                f.readline()
    except Exception as e:  # noqa: BLE001 - any failure to read is reported to the user
        return f"{e.__class__.__name__}: {e}"
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_revision(dataset_id: str) -> str:
    """The hub commit of a dataset; raises when the hub cannot be reached."""
    if _hub_offline():
        raise ConnectionError("offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset_id, timeout=10).sha or "unknown"


@contextlib.contextmanager
def _quiet_datatrove():
    """datatrove logs every task at INFO on stderr and exact dedup draws tqdm bars: keep
    WARNING and up there (full logs still go to logs/*/logs/task_*.log) so the rich progress
    stays readable."""
    import datatrove.executor.base as base
    from loguru import logger as loguru

    orig_add, orig_close = base.add_task_logger, base.close_task_logger
    fmt = "{time:HH:mm:ss} | {level: <8} | {name}:{line} - {message}"

    def add(logging_dir, rank, local_rank=0, node_rank=-1):
        loguru.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        loguru.add(sys.stderr, level="WARNING", format=fmt)
        loguru.add(logfile, level="DEBUG", format=fmt)
        return logfile

    def close(logfile):
        loguru.complete()
        loguru.remove()
        loguru.add(sys.stderr, level="WARNING", format=fmt)
        logfile.close()

    # exact dedup draws tqdm bars of its own on stderr
    import datatrove.pipeline.dedup.exact_dedup as exact_dedup

    orig_tqdm = exact_dedup.tqdm
    base.add_task_logger, base.close_task_logger = add, close
    exact_dedup.tqdm = functools.partial(orig_tqdm, disable=True)
    try:
        yield
    finally:
        base.add_task_logger, base.close_task_logger = orig_add, orig_close
        exact_dedup.tqdm = orig_tqdm


def _executor(pipeline, tasks: int, logging_dir: Path):
    from datatrove.executor import LocalPipelineExecutor

    class QuietLocalExecutor(LocalPipelineExecutor):
        def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
            with _quiet_datatrove():
                return super()._run_for_rank(rank, local_rank, node_rank)

    workers = max(1, min(tasks, os.cpu_count() or 1))
    return QuietLocalExecutor(pipeline, tasks=tasks, workers=workers,
                              logging_dir=str(logging_dir), skip_completed=False)


def _execute(pipeline, tasks: int, logging_dir: Path) -> dict[str, float]:
    """Run a pipeline; our counters from its merged stats. The executor's own summary
    (INFO/SUCCESS, in this process) is kept off the console too."""
    from datatrove.utils.logging import setup_default_logger
    from loguru import logger as loguru

    loguru.remove()
    loguru.add(sys.stderr, level="WARNING")
    try:
        _executor(pipeline, tasks, logging_dir).run()
    finally:
        setup_default_logger()
    return _counters(logging_dir / "stats.json")


def _counters(stats_json: Path) -> dict[str, float]:
    """Our `<step>:<source>:<what>` counters from an executor's merged stats.json."""
    out: dict[str, float] = {}
    for block in json.loads(stats_json.read_text()):
        for k, v in (block.get("stats") or {}).items():
            if k.count(":") >= 2:
                out[k] = out.get(k, 0) + (v["total"] if isinstance(v, dict) else v)
    return out


class CorpusStage(Stage):
    name = "corpus"
    Config = CorpusConfig

    @classmethod
    def from_manifest(cls, loaded: "Loaded") -> "CorpusStage":
        c = loaded.manifest.corpus

        def conv(src, name: str) -> SourceConfig:
            hf = None
            if src.hf_dataset is not None:
                local = loaded.resolve(src.hf_dataset.id)
                hf = HFDataset(id=str(local) if local.exists() else src.hf_dataset.id,
                               split=src.hf_dataset.split, config=src.hf_dataset.config)
            return SourceConfig(name=name, path=str(loaded.resolve(src.path)) if src.path else None,
                                hf_dataset=hf, text_field=src.text_field)

        return cls(CorpusConfig(
            sources=[conv(s, s.name) for s in c.sources],
            heldout=conv(c.heldout, HELDOUT_NAME) if c.heldout is not None else None,
            heldout_fraction=c.heldout_fraction, min_words=c.min_words,
            exact_dedup=c.exact_dedup))

    def _all_sources(self) -> list[tuple[str, SourceConfig]]:
        c = self.config
        out = [(f"corpus.sources[{i}] ({s.name})", s) for i, s in enumerate(c.sources)]
        if c.heldout is not None:
            out.append(("corpus.heldout", c.heldout))
        return out

    def check(self) -> list[str]:
        problems = []
        if self.config.heldout is not None and any(s.name == HELDOUT_NAME
                                                   for s in self.config.sources):
            problems.append(f"corpus.sources: the name {HELDOUT_NAME!r} is reserved for "
                            "corpus.heldout; rename that source")
        for where, s in self._all_sources():
            if s.path is not None:
                files = source_files(s.path)
                if not files:
                    problems.append(f"{where}: path {s.path} matches no file; fix the path "
                                    "(a .jsonl/.jsonl.gz file or a glob)")
                for f in files:
                    why = _readable(f)
                    if why:
                        problems.append(f"{where}: cannot read {f} ({why})")
                        break
            else:
                hf = s.hf_dataset
                if os.path.isabs(hf.id) and Path(hf.id).is_dir():
                    continue
                try:
                    _hub_revision(hf.id)
                except Exception as e:  # noqa: BLE001 - network, auth or a wrong id
                    problems.append(
                        f"{where}: Hugging Face dataset {hf.id!r} is unreachable "
                        f"({e.__class__.__name__}: {str(e)[:120]}); when offline, download it "
                        "and give hf_dataset.id as a local folder, or give a JSON Lines `path`")
        return problems

    def fingerprint(self) -> dict[str, str]:
        fp = {}
        for _, s in self._all_sources():
            key = f"source:{s.name}"
            if s.path is not None:
                files = source_files(s.path)
                fp[key] = file_digest(files) if files else "missing"
            elif os.path.isabs(s.hf_dataset.id) and Path(s.hf_dataset.id).is_dir():
                files = sorted(p for p in Path(s.hf_dataset.id).rglob("*") if p.is_file())
                fp[key] = file_digest(files)
            else:
                try:
                    fp[key] = "hub:" + _hub_revision(s.hf_dataset.id)
                except Exception:  # noqa: BLE001 - check() reports it
                    fp[key] = "hub:unreachable"
        return fp

    # --- the pipeline ---------------------------------------------------------------------

    def _readers(self, work: Path) -> tuple[list, int]:
        """One counting reader per source (and the held-out file); the task count."""
        from factory.corpus.steps import SourceHFReader, SourceJsonlReader

        readers, max_files = [], 1
        for _, s in self._all_sources():
            held = s is self.config.heldout
            if s.path is not None:
                files = source_files(s.path)
                if not files:
                    raise UserError(f"corpus source {s.name!r}: path {s.path} matches no file")
                root = Path(os.path.commonpath([str(f.parent) for f in files]))
                listing = work / "paths" / f"{s.name}.txt"
                listing.parent.mkdir(parents=True, exist_ok=True)
                listing.write_text("".join(f"{f.relative_to(root)}\n" for f in files))
                readers.append(SourceJsonlReader(str(root), str(listing), s.name,
                                                 text_key=s.text_field, heldout=held))
                max_files = max(max_files, len(files))
            else:
                hf = s.hf_dataset
                readers.append(SourceHFReader(hf.id, hf.split, hf.config, s.name,
                                              text_key=s.text_field, heldout=held))
        return readers, min(max_files, os.cpu_count() or 1)

    def run(self, ctx: StageContext) -> dict[str, float]:
        from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter,
                                                          ExactDedupSignature, ExactFindDedups)
        from datatrove.pipeline.writers import JsonlWriter

        from factory.corpus.steps import (OUT_KEY, HeldoutSplit, MinWordsFilter, NormalizeText,
                                          SourceCounter, dedup_content, dedup_priority,
                                          write_adapter)

        c = self.config
        out = Path(ctx.out)
        # A killed earlier attempt may have left part of an output here: start clean.
        for sub in ("train", "heldout", "logs", ".work", "stats.json"):
            p = out / sub
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        work = out / ".work"
        _, tasks = self._readers(work)
        dedup_cfg = ExactDedupConfig(content_getter=dedup_content, document_priority=dedup_priority)
        fraction = 0.0 if c.heldout is not None else c.heldout_fraction

        def cleaned():
            # fresh step objects per executor: datatrove keeps stats on them
            return [*self._readers(work)[0], NormalizeText(), MinWordsFilter(c.min_words)]

        phases = 3 if c.exact_dedup else 1
        with ctx.track(phases, "corpus: clean, dedup, split") as bar:
            if c.exact_dedup:
                early = _execute([*cleaned(), ExactDedupSignature(str(work / "sigs"), dedup_cfg)],
                                 tasks, out / "logs" / "1_signatures")
                self._no_empty_source(early, ("read", "normalize", "min_words"))
                bar.advance(1, phase="signatures")
                _execute([ExactFindDedups(str(work / "sigs"), str(work / "dups"), dedup_cfg)],
                         1, out / "logs" / "2_find_duplicates")
                bar.advance(1, phase="duplicates")
            dedup = ([ExactDedupFilter(str(work / "dups"), dedup_cfg), SourceCounter("exact_dedup")]
                     if c.exact_dedup else [])
            writer = JsonlWriter(str(out), output_filename=f"${{{OUT_KEY}}}/${{rank}}.jsonl.gz",
                                 compression="gzip", adapter=write_adapter)
            counters = _execute([*cleaned(), *dedup, HeldoutSplit(fraction, c.split_seed), writer],
                                tasks, out / "logs" / "3_write")
            bar.advance(1, phase="written")
        self._no_empty_source(counters, STEPS)
        shutil.rmtree(work, ignore_errors=True)

        stats = self._stats(counters)
        if stats["heldout"]["docs"] == 0:
            kept = sum(s["docs"] for s in stats["sources"].values())
            raise UserError(f"corpus: no held-out document (heldout_fraction="
                            f"{c.heldout_fraction} of {kept} kept documents rounds to none); "
                            "raise corpus.heldout_fraction or give corpus.heldout")
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        ctx.log.artifact(out / "stats.json")
        metrics = self._metrics(stats)
        logger.info("corpus: %d docs kept (%d words), %d held out", metrics["docs_kept"],
                    metrics["words_kept"], metrics["heldout_docs"])
        return metrics

    # --- counts -------------------------------------------------------------------------------

    def _steps(self) -> tuple[str, ...]:
        return STEPS if self.config.exact_dedup else tuple(s for s in STEPS if s != "exact_dedup")

    def _step_counts(self, counters: dict[str, float], src: str, steps) -> list[dict]:
        rows, prev_out = [], None
        for st in steps:
            if st not in self._steps():
                continue
            d_in = counters.get(f"{st}:{src}:in", prev_out if prev_out is not None else 0)
            d_out = counters.get(f"{st}:{src}:out", 0)
            row = {"name": st, "docs_in": int(d_in), "docs_out": int(d_out)}
            prefix = f"{st}:{src}:dropped_"
            dropped = {k[len(prefix):]: int(v) for k, v in counters.items() if k.startswith(prefix)}
            if st == "exact_dedup":
                dropped = {"duplicate": int(d_in - d_out)}
            if st == "heldout_split":
                row["heldout"] = int(counters.get(f"{st}:{src}:heldout_docs", 0))
            if f"{st}:{src}:truncated_files" in counters:
                row["truncated_files"] = int(counters[f"{st}:{src}:truncated_files"])
            if dropped:
                row["dropped"] = dropped
            rows.append(row)
            prev_out = d_out
        return rows

    def _no_empty_source(self, counters: dict[str, float], steps) -> None:
        c = self.config
        why = {
            "read": lambda s: (f"no readable document (bad JSON lines or no "
                               f"{s.text_field!r} text field)"),
            "normalize": lambda s: "every text is empty after normalisation",
            "min_words": lambda s: f"every document is shorter than corpus.min_words={c.min_words}",
            "exact_dedup": lambda s: "every document duplicates another (exact dedup)",
            "heldout_split": lambda s: (f"every document went to the held-out split "
                                        f"(heldout_fraction={c.heldout_fraction})"),
        }
        for _, s in self._all_sources():
            is_held = s is c.heldout
            for row in self._step_counts(counters, s.name, steps):
                empty = row["docs_out"] == 0 and not (is_held and row["name"] == "heldout_split")
                if empty:
                    raise UserError(f"corpus source {s.name!r}: {why[row['name']](s)} "
                                    f"({row['docs_in']} in, 0 left after {row['name']}); "
                                    "check the data or relax the filter")

    def _stats(self, counters: dict[str, float]) -> dict:
        c = self.config
        stats: dict = {"sources": {}, "heldout": {"docs": 0, "words": 0}}
        for s in c.sources:
            n = s.name
            stats["sources"][n] = {
                "steps": self._step_counts(counters, n, self._steps()),
                "docs": int(counters.get(f"heldout_split:{n}:train_docs", 0)),
                "words": int(counters.get(f"heldout_split:{n}:train_words", 0)),
                "heldout_docs": int(counters.get(f"heldout_split:{n}:heldout_docs", 0)),
                "heldout_words": int(counters.get(f"heldout_split:{n}:heldout_words", 0)),
            }
        names = [s.name for s in c.sources] + ([HELDOUT_NAME] if c.heldout else [])
        stats["heldout"]["docs"] = sum(int(counters.get(f"heldout_split:{n}:heldout_docs", 0))
                                       for n in names)
        stats["heldout"]["words"] = sum(int(counters.get(f"heldout_split:{n}:heldout_words", 0))
                                        for n in names)
        if c.heldout is not None:
            stats["heldout"]["path"] = c.heldout.path or c.heldout.hf_dataset.id
            stats["heldout"]["steps"] = self._step_counts(counters, HELDOUT_NAME, self._steps())
        else:
            stats["heldout"]["fraction"] = c.heldout_fraction
            stats["heldout"]["split_seed"] = c.split_seed
        return stats

    def _metrics(self, stats: dict) -> dict[str, float]:
        m: dict[str, float] = {}
        for n, s in stats["sources"].items():
            steps = {r["name"]: r for r in s["steps"]}
            m[f"{n}.docs_read"] = steps["read"]["docs_in"]
            m[f"{n}.corrupt_lines"] = sum(steps["read"].get("dropped", {}).values())
            m[f"{n}.too_short"] = steps["min_words"]["docs_in"] - steps["min_words"]["docs_out"]
            if "exact_dedup" in steps:
                m[f"{n}.duplicates"] = steps["exact_dedup"]["dropped"]["duplicate"]
            m[f"{n}.docs_kept"] = s["docs"]
            m[f"{n}.words_kept"] = s["words"]
            m[f"{n}.heldout_docs"] = s["heldout_docs"]
        srcs = stats["sources"]
        m["docs_read"] = sum(m[f"{n}.docs_read"] for n in srcs)
        m["corrupt_lines"] = sum(m[f"{n}.corrupt_lines"] for n in srcs)
        m["duplicates"] = sum(m.get(f"{n}.duplicates", 0) for n in srcs)
        m["docs_kept"] = sum(s["docs"] for s in srcs.values())
        m["words_kept"] = sum(s["words"] for s in srcs.values())
        m["heldout_docs"] = stats["heldout"]["docs"]
        m["heldout_words"] = stats["heldout"]["words"]
        return {k: float(v) for k, v in m.items()}
