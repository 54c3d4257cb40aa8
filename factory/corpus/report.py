"""Corpus statistics from the pipelines' counters: per source, documents and words before and
after each step and removals by reason (stats.json); the headline metrics; the standalone
report of `factory corpus prepare`; the check that no source was emptied."""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.stage import UserError

if TYPE_CHECKING:
    from factory.corpus.stage import CorpusStage

# steps of the first (cleaning) pass: they can be checked before dedup runs
_CLEAN_STEPS = ("read", "normalize", "min_words", "decontaminate")


def step_counts(counters: dict[str, float], src: str, steps: list[str]) -> list[dict]:
    rows, prev_out, prev_words = [], None, None
    for st in steps:
        d_in = counters.get(f"{st}:{src}:in", prev_out if prev_out is not None else 0)
        d_out = counters.get(f"{st}:{src}:out", 0)
        w_out = counters.get(f"{st}:{src}:words_out", 0)
        row = {"name": st, "docs_in": int(d_in), "docs_out": int(d_out),
               "words_in": int(prev_words or 0) if st != "read" else None,
               "words_out": int(w_out)}
        if row["words_in"] is None:
            del row["words_in"]
        prefix = f"{st}:{src}:dropped_"
        dropped = {k[len(prefix):]: int(v) for k, v in counters.items() if k.startswith(prefix)}
        if st == "exact_dedup":
            dropped = {"duplicate": int(d_in - d_out)}
        if st == "near_dedup":
            dropped = {"near_duplicate": int(d_in - d_out)}
        if st == "heldout_split":
            row["heldout"] = int(counters.get(f"{st}:{src}:heldout_docs", 0))
            # held-out documents leave the training stream here, they are not removed
            row["docs_out"] = int(d_in) - row["heldout"]
            row["words_out"] = int(counters.get(f"{st}:{src}:train_words", 0))
        if f"{st}:{src}:truncated_files" in counters:
            row["truncated_files"] = int(counters[f"{st}:{src}:truncated_files"])
        if dropped:
            row["dropped"] = dropped
        rows.append(row)
        prev_out, prev_words = row["docs_out"], row["words_out"]
    return rows


def no_empty_source(stage: CorpusStage, counters: dict[str, float], final: bool) -> None:
    """A user error naming the source and the step that removed all of its documents."""
    c = stage.config

    def why(step: str, s) -> str:
        if step == "read":
            return f"no readable document (bad records or no {s.text_field!r} text field)"
        if step == "normalize":
            return "every text is empty after normalisation"
        if step == "min_words":
            return f"every document is shorter than corpus.min_words={c.min_words}"
        if step.startswith("filter_"):
            return f"the {step[7:]} filter removed every document"
        if step == "decontaminate":
            return "every document overlaps a benchmark test text"
        if step == "heldout_split":
            return f"every document went to the held-out split (heldout_fraction=" \
                   f"{c.heldout_fraction})"
        return f"every document duplicates another ({step})"

    for _, s in stage._all_sources():
        steps = stage.steps(s)
        if not final:
            steps = [st for st in steps if st in _CLEAN_STEPS or st.startswith("filter_")]
        for row in step_counts(counters, s.name, steps):
            held = s is c.heldout and row["name"] == "heldout_split"
            if row["docs_out"] == 0 and not held:
                raise UserError(f"corpus source {s.name!r}: {why(row['name'], s)} "
                                f"({row['docs_in']} in, 0 left after {row['name']}); "
                                "check the data or relax the filter")


def removed(rows: list[dict]) -> dict[str, int]:
    """Removals by kind over step rows (one source's or several sources')."""
    out: dict[str, int] = {}

    def add(k: str, n: int) -> None:
        out[k] = out.get(k, 0) + n

    for r in rows:
        st, dropped = r["name"], r.get("dropped", {})
        if st == "read":
            add("corrupt", sum(dropped.values()))
        elif st == "exact_dedup":
            add("exact_dup", dropped.get("duplicate", 0))
        elif st == "near_dedup":
            add("near_dup", dropped.get("near_duplicate", 0))
        elif st == "decontaminate":
            add("decontaminated", sum(dropped.values()))
            for task, n in dropped.items():
                add(f"decontaminated:{task}", n)
        elif st.startswith("filter_"):
            add(f"filtered:{st[7:]}", sum(dropped.values()))
        elif st in ("normalize", "min_words"):
            add(f"filtered:{st}", sum(dropped.values()))
    return out


def corpus_stats(stage: CorpusStage, counters: dict[str, float], corrupt: list[dict]) -> dict:
    c = stage.config
    stats: dict = {"sources": {}, "heldout": {"docs": 0, "words": 0}}
    for s in c.sources:
        n = s.name
        steps = step_counts(counters, n, stage.steps(s))
        stats["sources"][n] = {
            "steps": steps,
            "removed": removed(steps),
            "docs": int(counters.get(f"heldout_split:{n}:train_docs", 0)),
            "words": int(counters.get(f"heldout_split:{n}:train_words", 0)),
            "heldout_docs": int(counters.get(f"heldout_split:{n}:heldout_docs", 0)),
            "heldout_words": int(counters.get(f"heldout_split:{n}:heldout_words", 0)),
        }
    names = [s.name for s in c.sources] + ([c.heldout.name] if c.heldout else [])
    stats["heldout"]["docs"] = sum(int(counters.get(f"heldout_split:{n}:heldout_docs", 0))
                                   for n in names)
    stats["heldout"]["words"] = sum(int(counters.get(f"heldout_split:{n}:heldout_words", 0))
                                    for n in names)
    if c.heldout is not None:
        stats["heldout"]["path"] = c.heldout.path or c.heldout.hf_dataset.id
        stats["heldout"]["steps"] = step_counts(counters, c.heldout.name, stage.steps(c.heldout))
    else:
        stats["heldout"]["fraction"] = c.heldout_fraction
        stats["heldout"]["split_seed"] = c.split_seed
    if c.near_dedup is not None:
        nd = c.near_dedup
        stats["near_dedup"] = {"n_grams": nd.n_grams, "buckets": nd.buckets,
                               "hashes_per_bucket": nd.hashes_per_bucket,
                               "threshold": round(nd.threshold, 4)}
    if c.decontaminate is not None:
        stats["decontaminate"] = {"ngram": c.decontaminate.ngram,
                                  "tasks": [t.task for t in c.decontaminate.tests],
                                  "not_decontaminated": c.decontaminate.unread_tasks}
    stats["corrupt_lines"] = corrupt
    return stats


def prepare_report(stats: dict) -> dict:
    """The `factory corpus prepare` report: steps summed over inputs, removals, corrupt lines."""
    order: list[str] = []
    total: dict[str, dict] = {}
    for s in stats["sources"].values():
        for r in s["steps"]:
            if r["name"] == "heldout_split":
                continue
            if r["name"] not in total:
                order.append(r["name"])
                total[r["name"]] = {"name": r["name"], "docs_in": 0, "docs_out": 0}
            total[r["name"]]["docs_in"] += r["docs_in"]
            total[r["name"]]["docs_out"] += r["docs_out"]
    rows = [total[n] for n in order]
    all_rows = [r for s in stats["sources"].values() for r in s["steps"]]
    rem = {k: v for k, v in removed(all_rows).items() if ":" not in k or
           k.startswith("filtered:")}
    per_task = {k.split(":", 1)[1]: v for k, v in removed(all_rows).items()
                if k.startswith("decontaminated:")}
    out = {"steps": rows, "removed": rem,
           "corrupt_lines": [{k: r[k] for k in ("file", "line", "reason")}
                             for r in stats["corrupt_lines"]],
           "kept": sum(s["docs"] for s in stats["sources"].values())}
    if per_task:
        out["decontaminated_by_task"] = per_task
    return out


def metrics_of(stats: dict) -> dict[str, float]:
    m: dict[str, float] = {}
    for n, s in stats["sources"].items():
        steps = {r["name"]: r for r in s["steps"]}
        m[f"{n}.docs_read"] = steps["read"]["docs_in"]
        m[f"{n}.corrupt_lines"] = sum(steps["read"].get("dropped", {}).values())
        m[f"{n}.too_short"] = steps["min_words"]["docs_in"] - steps["min_words"]["docs_out"]
        for k, v in s["removed"].items():
            if k not in ("corrupt",) and not k.startswith("decontaminated:"):
                m[f"{n}.removed.{k.replace(':', '.')}"] = v
        if "exact_dedup" in steps:
            m[f"{n}.duplicates"] = steps["exact_dedup"]["dropped"]["duplicate"]
        m[f"{n}.docs_kept"] = s["docs"]
        m[f"{n}.words_kept"] = s["words"]
        m[f"{n}.heldout_docs"] = s["heldout_docs"]
    srcs = stats["sources"]
    m["docs_read"] = sum(m[f"{n}.docs_read"] for n in srcs)
    m["corrupt_lines"] = sum(m[f"{n}.corrupt_lines"] for n in srcs)
    m["duplicates"] = sum(m.get(f"{n}.duplicates", 0) for n in srcs)
    m["near_duplicates"] = sum(s["removed"].get("near_dup", 0) for s in srcs.values())
    m["decontaminated"] = sum(s["removed"].get("decontaminated", 0) for s in srcs.values())
    m["docs_kept"] = sum(s["docs"] for s in srcs.values())
    m["words_kept"] = sum(s["words"] for s in srcs.values())
    m["heldout_docs"] = stats["heldout"]["docs"]
    m["heldout_words"] = stats["heldout"]["words"]
    return {k: float(v) for k, v in m.items()}


def stats_markdown(stats: dict) -> str:
    """Per source, documents and words after each step, as a markdown table (the run report's
    corpus section; written to corpus/stats.md)."""
    lines = ["| source | step | docs in | docs out | words out | removed |",
             "|---|---|---:|---:|---:|---|"]
    for n, s in stats["sources"].items():
        for r in s["steps"]:
            why = ", ".join(f"{k} {v:,}" for k, v in r.get("dropped", {}).items() if v)
            if r["name"] == "heldout_split":
                why = f"held out {r.get('heldout', 0):,}"
            lines.append(f"| {n} | {r['name']} | {r['docs_in']:,} | {r['docs_out']:,} | "
                         f"{r['words_out']:,} | {why} |")
    return "\n".join(lines) + "\n"
