"""The corpus stage: sources -> cleaned, filtered, deduplicated, decontaminated JSON Lines
shards + a held-out split.

datatrove pipelines (corpus.executor: local processes or Slurm), in passes:
  1 clean      read (JSON Lines/Parquet/text/HF dataset) -> normalise -> min words -> quality
               filters per source -> decontaminate -> .work/clean/<rank>.jsonl
  2 dedup      exact: signatures, duplicates (held-out copies win); near: MinHash signatures,
               buckets, clusters; over all sources and the held-out text at once
  3 write      exact and near dedup filters -> held-out split -> JsonlWriter (gzip)

Output (the corpus/ contract): train/<source>/*.jsonl.gz, heldout/*.jsonl.gz, stats.json
(per source: docs and words before/after each step, removals by reason, corrupt lines with
file and line); datatrove's logs and per-task stats under logs/.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from factory.corpus.execute import execute
from factory.corpus.options import Executor, Filters, NearDedup
from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

logger = logging.getLogger(__name__)

HELDOUT_NAME = "heldout"
CORRUPT_REPORT_LIMIT = 1000


class HFDataset(StageConfig):
    id: str = Field(description="Hub id, or an absolute local dataset folder")
    split: str = "train"
    config: str | None = None


class SourceConfig(StageConfig):
    name: str
    path: str | None = Field(None, description="Absolute file or glob")
    hf_dataset: HFDataset | None = None
    text_field: str = "text"
    format: str = Field("auto", description="auto, jsonl, parquet or text")
    text_unit: str = Field("file", description="text: a document per file or per line")
    filters: Filters = Filters()


class BenchmarkText(StageConfig):
    task: str
    kind: str = Field(description="A reader of factory.corpus.decontaminate.TEST_TEXTS")
    path: str


def _suite_tests(loaded: "Loaded") -> list[BenchmarkText]:
    """The test splits of the manifest's benchmark suites whose task folders exist."""
    from factory.bench.data import find_task_folder
    from factory.bench.suites import SUITES
    from factory.corpus.decontaminate import suite_ref

    out = []
    for run in loaded.manifest.evaluation.suites:
        suite = SUITES[run.suite]
        data = loaded.resolve(run.data) if run.data else suite.data_dir
        wanted = {t.lower() for t in run.tasks} if run.tasks else None
        for name, spec in suite.tasks.items():
            if wanted is not None and name.lower() not in wanted:
                continue
            folder = find_task_folder(data, spec.prefixes)
            if folder is not None:
                out.append(BenchmarkText(task=f"{run.suite}:{name}", kind="suite",
                                         path=suite_ref(folder, run.suite, name)))
    return out


class DecontaminateConfig(StageConfig):
    tests: list[BenchmarkText]
    ngram: int = 13
    min_words: int = 8
    unread_tasks: list[str] = Field([], description="Evaluation tasks whose test format no "
                                    "reader of TEST_TEXTS knows yet (not decontaminated)")


class CorpusConfig(StageConfig):
    sources: list[SourceConfig]
    heldout: SourceConfig | None = None
    heldout_fraction: float = 0.01
    min_words: int = 5
    exact_dedup: bool = True
    near_dedup: NearDedup | None = None
    decontaminate: DecontaminateConfig | None = None
    executor: Executor = Executor()
    split_seed: int = Field(0, description="Salt of the held-out hash; fixed so that every "
                            "training seed is evaluated on the same held-out documents")
    train_dir: str = Field("train/{source}", description="Output folder of a source's kept "
                           "documents; `factory corpus prepare` writes {source}")
    require_heldout: bool = True


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


class CorpusStage(Stage):
    name = "corpus"
    Config = CorpusConfig

    @classmethod
    def from_manifest(cls, loaded: Loaded) -> CorpusStage:
        m = loaded.manifest
        c = m.corpus

        def conv(src, name: str) -> SourceConfig:
            hf = None
            if src.hf_dataset is not None:
                local = loaded.resolve(src.hf_dataset.id)
                hf = HFDataset(id=str(local) if local.exists() else src.hf_dataset.id,
                               split=src.hf_dataset.split, config=src.hf_dataset.config)
            return SourceConfig(name=name, path=str(loaded.resolve(src.path)) if src.path else None,
                                hf_dataset=hf, text_field=src.text_field, format=src.format,
                                text_unit=src.text_unit,
                                filters=src.filters if src.filters is not None else c.filters)

        decon = None
        if c.decontaminate is not None:
            from factory.corpus.decontaminate import TEST_TEXTS

            d = c.decontaminate
            tasks = m.evaluation.tasks if d.tasks else []
            unread = [t.name for t in tasks if t.kind not in TEST_TEXTS]
            if unread:
                logger.warning("decontamination: no reader yet for the test texts of %s; "
                               "those benchmarks are not decontaminated", ", ".join(unread))
            tests = [BenchmarkText(task=t.name, kind=t.kind, path=str(loaded.resolve(t.data)))
                     for t in tasks if t.kind in TEST_TEXTS]
            tests += [BenchmarkText(task=Path(f).stem, kind="text", path=str(loaded.resolve(f)))
                      for f in d.files]
            if d.tasks:
                tests += _suite_tests(loaded)
            if tests:
                decon = DecontaminateConfig(tests=tests, ngram=d.ngram, min_words=d.min_words,
                                            unread_tasks=unread)
        return cls(CorpusConfig(
            sources=[conv(s, s.name) for s in c.sources],
            heldout=conv(c.heldout, HELDOUT_NAME) if c.heldout is not None else None,
            heldout_fraction=c.heldout_fraction, min_words=c.min_words,
            exact_dedup=c.exact_dedup, near_dedup=c.near_dedup, decontaminate=decon,
            executor=c.executor))

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
        if self.config.decontaminate is not None:
            from factory.corpus.decontaminate import TEST_TEXTS, test_files, test_location

            for t in self.config.decontaminate.tests:
                if t.kind not in TEST_TEXTS:
                    problems.append(f"decontamination of {t.task!r}: no reader for test texts "
                                    f"of kind {t.kind!r} (known: {', '.join(TEST_TEXTS)})")
                elif not test_files(t.kind, Path(t.path)):
                    problems.append(f"decontamination of {t.task!r}: "
                                    f"{test_location(t.kind, Path(t.path))} does not exist; fix "
                                    "the task's data folder or corpus.decontaminate.files")
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
        if self.config.decontaminate is not None:
            from factory.corpus.decontaminate import test_files

            for t in self.config.decontaminate.tests:
                files = test_files(t.kind, Path(t.path))
                fp[f"test:{t.task}"] = file_digest(files) if files else "missing"
        return fp

    # --- the pipeline ---------------------------------------------------------------------

    def _readers(self, work: Path, corrupt_dir: Path | None = None) -> tuple[list, int]:
        """One counting reader per source (and the held-out text); the task count."""
        from factory.corpus.readers import (
            READERS,
            SourceHFReader,
            SourceTextReader,
            file_format,
        )

        readers, max_files = [], 1
        bad = str(corrupt_dir) if corrupt_dir else None
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
                fmt = s.format if s.format != "auto" else file_format(files[0])
                if fmt == "text":
                    readers.append(SourceTextReader(str(root), str(listing), s.name,
                                                    unit=s.text_unit, heldout=held,
                                                    corrupt_dir=bad))
                else:
                    readers.append(READERS[fmt](str(root), str(listing), s.name,
                                                text_key=s.text_field, heldout=held,
                                                corrupt_dir=bad))
                max_files = max(max_files, len(files))
            else:
                hf = s.hf_dataset
                readers.append(SourceHFReader(hf.id, hf.split, hf.config, s.name,
                                              text_key=s.text_field, heldout=held,
                                              corrupt_dir=bad))
        ex = self.config.executor
        tasks = ex.tasks or (max_files if ex.kind == "slurm" else min(max_files,
                                                                     os.cpu_count() or 1))
        return readers, tasks

    def steps(self, source: SourceConfig) -> list[str]:
        """The counted steps a source's documents pass, in order."""
        from factory.corpus.filters import filter_steps

        c = self.config
        out = ["read", "normalize", "min_words", *filter_steps(source.filters)]
        if c.decontaminate is not None:
            out.append("decontaminate")
        if c.exact_dedup:
            out.append("exact_dedup")
        if c.near_dedup is not None:
            out.append("near_dedup")
        return out + ["heldout_split"]

    # --- the pipeline ---------------------------------------------------------------------

    def run(self, ctx: StageContext) -> dict[str, float]:
        from factory.corpus.report import (
            corpus_stats,
            metrics_of,
            no_empty_source,
            stats_markdown,
        )

        c = self.config
        out = Path(ctx.out)
        # A killed earlier attempt may have left part of an output here: start clean.
        for sub in ("train", "heldout", "logs", ".work", "stats.json", "stats.md"):
            p = out / sub
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        if c.train_dir != "train/{source}":
            for s in c.sources:
                shutil.rmtree(out / c.train_dir.format(source=s.name), ignore_errors=True)
        passes = 2 + int(c.exact_dedup) + int(c.near_dedup is not None)
        with ctx.track(passes, "corpus: clean, filter, dedup, split") as bar:
            counters = self._pipeline(out, out / ".work", bar)
        from factory.corpus.readers import read_corrupt_notes

        corrupt = read_corrupt_notes(out / ".work" / "corrupt", CORRUPT_REPORT_LIMIT)
        no_empty_source(self, counters, final=True)
        shutil.rmtree(out / ".work", ignore_errors=True)

        stats = corpus_stats(self, counters, corrupt)
        if c.require_heldout and stats["heldout"]["docs"] == 0:
            kept = sum(s["docs"] for s in stats["sources"].values())
            raise UserError(f"corpus: no held-out document (heldout_fraction="
                            f"{c.heldout_fraction} of {kept} kept documents rounds to none); "
                            "raise corpus.heldout_fraction or give corpus.heldout")
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        (out / "stats.md").write_text(stats_markdown(stats), encoding="utf-8")
        ctx.log.artifact(out / "stats.json")
        ctx.log.artifact(out / "stats.md")
        for i, (name, row) in enumerate(_total_steps(stats)):
            ctx.log.metrics({"docs": float(row["docs_out"]), "words": float(row["words_out"])},
                            step=i)
        metrics = metrics_of(stats)
        logger.info("corpus: %d docs kept (%d words), %d held out", metrics["docs_kept"],
                    metrics["words_kept"], metrics["heldout_docs"])
        return metrics

    def _pipeline(self, out: Path, work: Path, bar) -> dict[str, float]:
        """The passes; the merged counters."""
        from datatrove.pipeline.dedup.exact_dedup import (
            ExactDedupConfig,
            ExactDedupFilter,
            ExactDedupSignature,
            ExactFindDedups,
        )
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter

        from factory.corpus.decontaminate import DecontaminateStep
        from factory.corpus.filters import SourceFilters
        from factory.corpus.report import no_empty_source
        from factory.corpus.steps import (
            OUT_KEY,
            HeldoutSplit,
            MinWordsFilter,
            NormalizeText,
            SourceCounter,
            dedup_content,
            dedup_priority,
            write_adapter,
        )

        c, ex, logs = self.config, self.config.executor, out / "logs"
        readers, tasks = self._readers(work, work / "corrupt")
        first = [*readers, NormalizeText(), MinWordsFilter(c.min_words)]
        per_source = {s.name: s.filters for _, s in self._all_sources() if s.filters.active()}
        if per_source:
            first.append(SourceFilters(per_source))
        if c.decontaminate is not None:
            d = c.decontaminate
            first.append(DecontaminateStep([(t.task, t.kind, t.path) for t in d.tests],
                                           d.ngram, d.min_words))
        clean = work / "clean"
        first.append(JsonlWriter(str(clean), output_filename="${rank}.jsonl", compression=None))
        counters = execute(first, tasks, logs / "1_clean", ex, "clean")
        no_empty_source(self, counters, final=False)
        bar.advance(1, phase="cleaned")

        # Later passes read the cleaned shards back, one task per shard: the same documents
        # in the same order per rank, which the dedup filters' per-rank indices rely on.
        shards = max(1, len(list(clean.glob("*.jsonl"))))

        def cleaned():
            return JsonlReader(str(clean), add_file_path=False)

        dedup_cfg = ExactDedupConfig(content_getter=dedup_content, document_priority=dedup_priority)
        last = []
        if c.exact_dedup:
            execute([cleaned(), ExactDedupSignature(str(work / "sigs"), dedup_cfg)],
                    shards, logs / "2_exact_signatures", ex, "exact-sigs")
            execute([ExactFindDedups(str(work / "sigs"), str(work / "dups"), dedup_cfg)],
                    1, logs / "3_exact_duplicates", ex, "exact-dups")
            last += [ExactDedupFilter(str(work / "dups"), dedup_cfg), SourceCounter("exact_dedup")]
            bar.advance(1, phase="exact dedup")
        if c.near_dedup is not None:
            last += self._near_dedup(cleaned, shards, work, logs)
            bar.advance(1, phase="near dedup")
        fraction = 0.0 if c.heldout is not None else c.heldout_fraction
        writer = JsonlWriter(str(out), output_filename=f"${{{OUT_KEY}}}/${{rank}}.jsonl.gz",
                             compression="gzip", adapter=write_adapter)
        final = execute([cleaned(), *last, HeldoutSplit(fraction, c.split_seed, c.train_dir),
                         writer], shards, logs / "9_write", ex, "write")
        bar.advance(1, phase="written")
        return {**counters, **final}

    def _near_dedup(self, cleaned, shards: int, work: Path, logs: Path) -> list:
        """Runs MinHash signatures, buckets and clusters; returns the filter step."""
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupSignature,
        )

        from factory.corpus.dedup import NearDedupFilter, heldout_clusters

        nd, ex = self.config.near_dedup, self.config.executor
        cfg = MinhashConfig(n_grams=nd.n_grams, num_buckets=nd.buckets,
                            hashes_per_bucket=nd.hashes_per_bucket, seed=nd.seed)
        sigs, buckets, clusters = work / "mh_sigs", work / "mh_buckets", work / "mh_clusters"
        execute([cleaned(), MinhashDedupSignature(str(sigs), config=cfg)], shards,
                logs / "4_minhash_signatures", ex, "mh-sigs")
        execute([MinhashDedupBuckets(str(sigs), str(buckets), config=cfg)], nd.buckets,
                logs / "5_minhash_buckets", ex, "mh-buckets")
        execute([MinhashDedupCluster(str(buckets), str(clusters), config=cfg,
                                     save_cluster_id=True)], 1,
                logs / "6_minhash_clusters", ex, "mh-clusters")
        held = []
        if self.config.heldout is not None:
            held = heldout_clusters(sorted((work / "clean").glob("*.jsonl")), clusters)
        return [NearDedupFilter(str(clusters), held)]


def _total_steps(stats: dict) -> list[tuple[str, dict]]:
    """Documents and words after each step, summed over sources (for step-indexed metrics)."""
    rows: dict[str, dict] = {}
    for s in stats["sources"].values():
        for r in s["steps"]:
            t = rows.setdefault(r["name"], {"docs_out": 0, "words_out": 0})
            t["docs_out"] += r["docs_out"]
            t["words_out"] += r.get("words_out", 0)
    return list(rows.items())
