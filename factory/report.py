"""Run reports: one page per `factory run` and per `factory compare`, as markdown and as a
self-contained HTML file (plots inlined), written into the run directory and logged to MLflow.

A report reads only the files the stages already wrote (their folder contracts), so it can be
rebuilt for any finished run; a section whose files are absent is left out.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)


class Page:
    """Blocks (heading, text, table, image) rendered twice: markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
        self.blocks.append(("table", (header, [[_cell(c) for c in r] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, b in self.blocks:
            if kind == "h2":
                out += [f"## {b}", ""]
            elif kind == "p":
                out += [b, ""]
            elif kind == "table":
                header, rows = b
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            else:
                path, alt = b
                out += [f"![{alt}]({path.name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
               "text-align:right}th{background:#eee}img{max-width:100%}</style></head><body>",
               f"<h1>{e(self.title)}</h1>"]
        for kind, b in self.blocks:
            if kind in ("h2", "p"):
                out.append(f"<{kind}>{e(b)}</{kind}>")
            elif kind == "table":
                header, rows = b
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                path, alt = b
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<p><img alt='{e(alt)}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, folder: Path, stem: str) -> list[Path]:
        md, page = folder / f"{stem}.md", folder / f"{stem}.html"
        md.write_text(self.markdown(), encoding="utf-8")
        page.write_text(self.html(), encoding="utf-8")
        return [md, page] + [b[0] for k, b in self.blocks if k == "img"]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _curves_png(curves: dict[str, list[tuple[float, float]]], path: Path, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, pts in curves.items():
        # A curve of a few evaluations shows its points.
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                marker="o" if len(pts) <= 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars_png(values: dict[str, float], path: Path, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(values), list(values.values()))
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _published() -> dict:
    """Published scores per task, where the bench package ships them."""
    import yaml

    path = Path(__file__).resolve().parent / "bench" / "published.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _published_for(task: str, published: dict) -> str:
    """'model: score (source)' lines of a task found anywhere in published.yaml."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if _norm(k) == _norm(task) and isinstance(v, (dict, int, float)):
                    found.append(_flat_scores(v))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(published)
    return "; ".join(f for f in found if f)


def _norm(name: Any) -> str:
    """NCBI-disease, ncbi_disease and NCBI disease name the same task."""
    return "".join(c for c in str(name).lower() if c.isalnum())


def _flat_scores(v: Any) -> str:
    if isinstance(v, (int, float)):
        return f"{v:g}"
    parts = [f"{k} {s:g}" for k, s in v.items() if isinstance(s, (int, float))]
    return ", ".join(parts[:4])


def run_report(run_dir: Path) -> list[Path]:
    """report.md + report.html (+ PNGs) of a finished or partial `factory run`."""
    run_dir = Path(run_dir)
    summary = _read(run_dir / "summary.json") or {}
    page = Page(f"factory run: {run_dir.name}")
    if summary.get("stages"):
        page.heading("Stages")
        page.table(["stage", "status", "seconds", "headline metrics"], [
            [n, s["status"], s["seconds"],
             ", ".join(f"{k}={v:.4g}" for k, v in list(s.get("metrics", {}).items())[:5])]
            for n, s in summary["stages"].items()])
    _corpus_section(page, run_dir)
    _blend_section(page, run_dir)
    _vocab_section(page, run_dir)
    _training_section(page, run_dir)
    _evaluation_section(page, run_dir)
    return page.write(run_dir, "report")


def _corpus_section(page: Page, run_dir: Path) -> None:
    stats = _read(run_dir / "corpus" / "stats.json")
    if not stats or "sources" not in stats:
        return
    page.heading("Corpus")
    rows = []
    for name, s in stats["sources"].items():
        for step in s.get("steps", []):
            rows.append([name, step.get("name"), step.get("docs_in"), step.get("docs_out")])
        rows.append([name, "kept", None, s.get("docs")])
    page.table(["source", "step", "docs in", "docs out"], rows)
    page.table(["source", "documents", "words"],
               [[n, s.get("docs"), s.get("words")] for n, s in stats["sources"].items()])


def _blend_section(page: Page, run_dir: Path) -> None:
    blend = _read(run_dir / "pretrain" / "blend.json")
    pack = _read(run_dir / "pack" / "pack.json")
    if isinstance(blend, dict) and isinstance(blend.get("sources"), dict):
        page.heading("Blend")
        keys = sorted({k for v in blend["sources"].values() if isinstance(v, dict) for k in v})
        page.table(["source", *keys], [[n, *(v.get(k) for k in keys)]
                                        for n, v in blend["sources"].items()])
    elif pack and pack.get("sources"):
        page.heading("Blend")
        page.table(["source", "weight", "documents", "tokens"],
                   [[n, s.get("weight"), s.get("docs"), s.get("tokens")]
                    for n, s in pack["sources"].items()])


def _vocab_section(page: Page, run_dir: Path) -> None:
    fert = _read(run_dir / "vocab" / "fertility.json")
    if not fert:
        return
    page.heading("Vocabulary")
    page.text(f"{fert.get('kind', 'base')} vocabulary of {fert.get('vocab_size', '?')} tokens.")
    rows = [[where, v.get("fertility"), v.get("split_share"), v.get("pieces_per_split_word"),
             v.get("coverage_top1000")]
            for where, v in fert.items() if isinstance(v, dict) and "fertility" in v]
    if rows:
        page.table(["text", "tokens per word", "share of words split", "pieces per split word",
                    "top-1000 words kept whole"], rows)
    for png in sorted((run_dir / "vocab").glob("*.png")):
        page.image(png, png.stem)


def _training_section(page: Page, run_dir: Path) -> None:
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    if not rows:
        return
    page.heading("Pretraining")
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    held = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    page.table(["steps", "first loss", "last loss", "held-out loss (last evaluation)",
                "median tokens/s", "tokens"], [[
        rows[-1]["step"], rows[0]["loss"], rows[-1]["loss"], held[-1][1] if held else None,
        sorted(tps)[len(tps) // 2] if tps else None, rows[-1].get("tokens")]])
    curves = {"train": [(r["step"], r["loss"]) for r in rows]}
    if held:
        curves["domain held-out"] = held
    general = [(r["step"], r["val_general_loss"]) for r in rows if "val_general_loss" in r]
    if general:
        curves["general held-out"] = general
    page.image(_curves_png(curves, run_dir / "report_loss.png", "loss (nats/token)"),
               "loss curve")


def _evaluation_section(page: Page, run_dir: Path) -> None:
    results = _read(run_dir / "evaluate" / "results.json")
    if not results:
        return
    page.heading("Evaluation")
    held = results.get("heldout") or {}
    if held:
        page.table(["held-out loss", "unigram baseline", "tokens"],
                   [[held.get("heldout_loss"), held.get("heldout_unigram_loss"),
                     held.get("heldout_tokens")]])
    published = _published()
    rows = []
    for name, r in (results.get("tasks") or {}).items():
        value = r.get("mean", r.get("f1"))
        baseline = r.get("dictionary_f1", (r.get("extra") or {}).get("baseline"))
        rows.append([name, r.get("metric"), value, baseline,
                     _published_for(name, published) or None])
    if rows:
        page.table(["task", "metric", "this model", "baseline", "published"], rows)


def compare_report(result: dict, run_dir: Path) -> list[Path]:
    """compare.md + compare.html (+ PNGs) of a `factory compare` result."""
    run_dir = Path(run_dir)
    arms = result["arms"]
    page = Page(f"factory compare: {Path(result['manifest']).stem} "
                f"({result.get('scale') or 'full'})")
    page.text("Equal budget: same model size, steps, batch and sequence length in every "
              "pretrained arm. Held-out losses are per word (BERT, whole-word masked) or per "
              "byte (GPT), so vocabularies compare.")
    unit = next((a["heldout_unit"] for a in arms.values() if a.get("heldout_unit")), "")
    page.heading("Held-out text")
    page.table(["arm", "steps", "tokens", f"domain ({unit})", f"general ({unit})", "note"],
               [[n, a["steps"], a["tokens"], a["domain_heldout_loss"],
                 a["general_heldout_loss"], a.get("note")] for n, a in arms.items()])
    tasks = sorted({t for a in arms.values() for t in a["benchmarks"]})
    if tasks:
        published = _published()
        page.heading("Benchmarks")
        page.table(["task", *arms, "published"],
                   [[t, *(a["benchmarks"].get(t) for a in arms.values()),
                     _published_for(t, published) or None] for t in tasks])
    curves = {n: a["loss_curve"] for n, a in arms.items() if a.get("loss_curve")}
    if curves:
        page.heading("Pretraining loss (nats/token: not comparable across vocabularies)")
        page.image(_curves_png(curves, run_dir / "compare_loss.png", "loss"), "loss curves")
    fert = {n: a["fertility"]["heldout"]["fertility"] for n, a in arms.items()
            if isinstance(a.get("fertility", {}).get("heldout"), dict)
            and "fertility" in a["fertility"]["heldout"]}
    if fert:
        page.heading("Fertility on the domain's held-out text (tokens per word)")
        page.table(["arm", "tokens per word"], fert.items())
        page.image(_bars_png(fert, run_dir / "compare_fertility.png", "tokens per word"),
                   "fertility")
    return page.write(run_dir, "compare")
