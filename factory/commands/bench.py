"""`factory bench MODEL_DIR --suite ...`: fine-tune and score a Hugging Face model folder on a
benchmark suite (factory.bench.runner), write results.json and a markdown table beside it."""

from __future__ import annotations

from pathlib import Path

import typer

from factory.stage import UserError


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `factory` app."""

    @app.command()
    def bench(
        model_dir: Path = typer.Argument(..., help="A Hugging Face model folder."),
        suite: str = typer.Option(..., help="blurb, lexglue, maltese, finance, code or "
                                            "stackoverflow."),
        tasks: str | None = typer.Option(None, help="Comma-separated task names "
                                                       "(default: all of the suite's)."),
        data_dir: Path | None = typer.Option(None, help="Folder with one sub-folder per "
                                                           "task (default: shared benchmarks)."),
        seeds: str = typer.Option("42", help="Comma-separated fine-tuning seeds."),
        max_train_examples: int | None = typer.Option(None, min=1,
                                                         help="Cap on training examples."),
        max_test_examples: int | None = typer.Option(None, min=1,
                                                        help="Cap on test examples."),
        max_seq_len: int | None = typer.Option(None, min=9, help="Override every task's "
                                                                    "max sequence length."),
        epochs: float | None = typer.Option(None, min=0.0, help="Override the epochs."),
        lr: float | None = typer.Option(None, min=0.0, help="Override the learning rate."),
        batch_size: int | None = typer.Option(None, min=1, help="Override the batch size."),
        output: Path = typer.Option(Path("results.json"), help="Where results.json goes; the "
                                                               "markdown table goes beside it."),
        mlflow: bool = typer.Option(True, help="Also log the results to MLflow."),
    ) -> None:
        """Evaluate MODEL_DIR on a benchmark suite against the published scores."""
        from factory.bench.session import bench_to_files

        overrides = {k: v for k, v in {"max_seq_length": max_seq_len, "epochs": epochs,
                                       "lr": lr, "batch_size": batch_size}.items()
                     if v is not None}
        results = bench_to_files(
            model_dir, suite, output, tasks=[t.strip() for t in tasks.split(",")]
            if tasks else None, data_dir=data_dir, seeds=_ints(seeds, "--seeds"),
            max_train_examples=max_train_examples, max_test_examples=max_test_examples,
            overrides=overrides, mlflow=mlflow)
        typer.echo(results["markdown"])
