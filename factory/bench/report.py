"""The markdown table of a suite's results beside the published scores (published.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

PUBLISHED = Path(__file__).with_name("published.yaml")


def published(suite: str) -> dict:
    """{"citation": str, "score": {model: value}, TASK: {model: value}} of a suite."""
    data = yaml.safe_load(PUBLISHED.read_text(encoding="utf-8")) or {}
    return data.get(suite, {})


def _fmt(r: dict) -> str:
    if len(r["values"]) > 1:
        return f"{r['mean']:.2f} ± {r['std']:.2f}"
    return f"{r['mean']:.2f}"


def markdown(results: dict) -> str:
    """One row per task (ours, n, then each published model), and the suite score row."""
    ref = published(results["suite"])
    models: list[str] = []
    for scores in ref.values():
        if isinstance(scores, dict):
            models += [m for m in scores if m not in models]
    head = ["task", "metric", "ours", "seeds", "n_train", "n_test", *models]
    lines = [f"### {results['suite']} — {results['model']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["tasks"].items():
        pub = ref.get(name, {})
        cells = [name, r["metric"], _fmt(r), str(len(r["seeds"])), str(r["n_train"]),
                 str(r["n_test"]), *[f"{pub[m]:.2f}" if m in pub else "" for m in models]]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("score") is not None:
        label = results.get("score_name", "score")
        if results.get("score_partial"):
            label += " (PARTIAL: " + str(len(results["groups"])) + " task types; missing " + \
                ", ".join(results["missing"]) + ")"
        pub = ref.get("score", {})
        cells = [f"**{label}**", "", f"**{results['score']:.2f}**", "", "", "",
                 *[f"{pub[m]:.2f}" if m in pub else "" for m in models]]
        lines.append("| " + " | ".join(cells) + " |")
    if ref.get("citation"):
        lines += ["", f"Published: {ref['citation']}."]
    return "\n".join(lines) + "\n"
