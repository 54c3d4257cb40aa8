"""`factory convert hf-to-megatron SRC DST` and `factory convert megatron-to-hf SRC DST`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `convert` command group to the `factory` app."""
    sub = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="Convert checkpoints between Hugging Face and Megatron layouts.")

    @sub.command("hf-to-megatron")
    def hf_to_megatron(
        src: str = typer.Argument(..., help="HF folder (BERT or Llama), hub id, or "
                                  "package:MODULE/SUBDIR."),
        dst: Path = typer.Argument(..., help="New Megatron checkpoint folder."),
    ) -> None:
        """A HF BERT/Llama folder -> model.json + checkpoints/ (dist_checkpointing) + tokenizer/."""
        from factory import base_checkpoint
        from factory.train.convert.folders import hf_to_megatron as convert

        summary = convert(base_checkpoint.resolve(src, Path.cwd()), dst)
        typer.echo(f"{dst}: {summary['family']}, {summary['parameters']:,} parameters")

    @sub.command("megatron-to-hf")
    def megatron_to_hf(
        src: Path = typer.Argument(..., help="Megatron folder (convert output or pretrain/)."),
        dst: Path = typer.Argument(..., help="New HF folder."),
        tokenizer: Optional[Path] = typer.Option(
            None, help="Tokenizer folder to include (default: SRC/tokenizer when present)."),
    ) -> None:
        """model.json + newest checkpoint -> BertForMaskedLM / LlamaForCausalLM folder.

        The checkpoint's pickles (its index, common.pt and the objects in its shards) are
        read as weights_only before megatron or torch reads them, and refused if they hold
        anything but checkpoint records, tensors and plain data."""
        from factory.train.convert.folders import megatron_to_hf as convert

        summary = convert(src, dst, tokenizer)
        typer.echo(f"{dst}: {summary['family']} from step {summary['step']}, "
                   f"{summary['parameters']:,} parameters")

    app.add_typer(sub, name="convert")
