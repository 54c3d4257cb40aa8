"""`factory merge A B OUT`: two Hugging Face checkpoints of one architecture, merged."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `merge` command to the `factory` app."""

    @app.command()
    def merge(
        a: str = typer.Argument(..., help="HF folder (e.g. a run's export/hf), hub id, or "
                                "package:MODULE/SUBDIR."),
        b: str = typer.Argument(..., help="HF folder of the same architecture and tokenizer "
                                "(e.g. the base it was continued from)."),
        out: Path = typer.Argument(..., help="New HF folder."),
        weight: float = typer.Option(0.5, help="B's share: 0 gives A, 1 gives B."),
        method: str = typer.Option("linear", help="linear or slerp (per tensor)."),
        keep_a_extras: bool = typer.Option(
            False, help="Copy tensors only A has (a trained MLM head whose base, a sentence "
                        "encoder, has none) instead of refusing; B's own extras are left out."),
    ) -> None:
        """Merge two HF models weight by weight (continued model + its base: less forgetting).

        The output keeps A's config, tokenizer and shards, and records the merge in
        merge.json. Different tensors, shapes or tokenizers are refused before anything is
        written."""
        from factory import base_checkpoint, cli
        from factory.merge import merge as run_merge

        src_a = base_checkpoint.resolve(a, Path.cwd())
        src_b = base_checkpoint.resolve(b, Path.cwd())
        summary = run_merge(src_a, src_b, out, weight=weight, method=method,
                            keep_a_extras=keep_a_extras, progress=cli.console_progress())
        typer.echo(f"{out}: {summary['method']} merge at B's share {summary['weight']}, "
                   f"{summary['tensors']} tensors ({summary['copied_from_a']} copied from A), "
                   f"{summary['parameters']:,} parameters")
