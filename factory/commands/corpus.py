"""`factory corpus prepare ...`: the corpus stage standalone, for users who only want clean data
(factory.corpus.stage does the work)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `factory` app."""
    corpus = typer.Typer(help="Corpus tools: clean, filter, deduplicate, decontaminate.",
                         no_args_is_help=True)

    @corpus.command("prepare")
    def prepare(
        input: list[str] = typer.Option(..., "--input", help="A file or glob (JSON Lines, "
                                        "Parquet or text); repeat for more"),
        output: Path = typer.Option(..., "--output", help="Folder for the kept documents"),
        text_field: str = typer.Option("text", "--text-field"),
        near_dedup: bool = typer.Option(False, "--near-dedup", help="MinHash near-dedup"),
        exact_dedup: bool = typer.Option(True, "--exact-dedup/--no-exact-dedup"),
        decontaminate: list[Path] = typer.Option(
            [], "--decontaminate", help="Test texts: a text file (one per line), an IOB "
            "file (.tsv/.iob) or a NER task folder (test.tsv); repeatable"),
        ngram: int = typer.Option(13, "--ngram", help="Decontamination n-gram (words)"),
        min_words: int = typer.Option(5, "--min-words"),
        language: list[str] = typer.Option([], "--language", help="Keep only these "
                                           "languages (py3langid codes); repeatable"),
        tasks: int | None = typer.Option(None, "--tasks", help="datatrove tasks"),
        report: Path | None = typer.Option(None, "--report", help="Write REPORT.json"),
    ) -> None:
        """Clean documents: normalise, filter, deduplicate, decontaminate; keep their fields."""
        from factory.corpus.prepare import prepare_corpus

        prepare_corpus(input, output, text_field=text_field, near_dedup=near_dedup,
                       exact_dedup=exact_dedup, decontaminate=decontaminate, ngram=ngram,
                       min_words=min_words, languages=language, tasks=tasks, report=report)

    app.add_typer(corpus, name="corpus")
