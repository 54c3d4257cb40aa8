"""The vocabulary report: tokenizers side by side on text sets, as JSON, a table and a plot.

Per (text set, tokenizer): fertility (tokens per whitespace word), split_share (0..1),
pieces_per_split_word and coverage_top1000 (share of the text's 1,000 most frequent words
kept whole), all from `tokenization.fertility`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenization.fertility import fertility_report, top_words

logger = logging.getLogger(__name__)

MEASURES = ("fertility", "split_share", "pieces_per_split_word", "coverage_top1000")
LABELS = {"fertility": "tokens per word", "split_share": "share of words split",
          "pieces_per_split_word": "pieces per split word",
          "coverage_top1000": "top-1000 words kept whole"}


def compare(tokenizers: dict[str, object], text_sets: dict[str, list[str]]) -> dict:
    """{set: {tokenizer: {measure: value, words, tokens}}, with "words" per set}.

    Each text set is a list (measured once per tokenizer); its top words come from itself.
    """
    out: dict = {}
    for set_name, texts in text_sets.items():
        top = top_words(texts)
        row: dict = {}
        for tok_name, tok in tokenizers.items():
            r = fertility_report(tok, texts, top=top)
            row[tok_name] = {k: r[k] for k in (*MEASURES, "words", "tokens")}
        out[set_name] = row
    return out


def markdown_table(results: dict) -> str:
    """One row per (text set, tokenizer), one column per measure."""
    lines = ["| text | tokenizer | words | fertility | words split | pieces / split word "
             "| top-1000 kept whole |", "|---|---|---:|---:|---:|---:|---:|"]
    for set_name, row in results.items():
        for tok_name, r in row.items():
            lines.append(f"| {set_name} | {tok_name} | {r['words']:,} | {r['fertility']:.3f} "
                         f"| {100 * r['split_share']:.1f}% | {r['pieces_per_split_word']:.2f} "
                         f"| {100 * r['coverage_top1000']:.1f}% |")
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: str | Path, title: str = "") -> Path:
    """A PNG: one panel per measure, text sets on the x axis, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    toks = list(dict.fromkeys(t for row in results.values() for t in row))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4 * len(MEASURES), 3.6))
    width = 0.8 / max(len(toks), 1)
    for ax, m in zip(axes, MEASURES):
        for j, t in enumerate(toks):
            xs = [i + (j - (len(toks) - 1) / 2) * width for i in range(len(sets))]
            ys = [results[s].get(t, {}).get(m, 0.0) for s in sets]
            bars = ax.bar(xs, ys, width, label=t)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_title(LABELS[m], fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(toks), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """report.json, report.md (the table) and report.png (the plot) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    head = f"# {title}\n\n" if title else ""
    (out / "report.md").write_text(head + markdown_table(results), encoding="utf-8")
    bar_plot(results, out / "report.png", title)
    return {"json": out / "report.json", "table": out / "report.md", "plot": out / "report.png"}
