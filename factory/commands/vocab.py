"""`factory vocab train | extend | report`: the tokenization library from the command line.

Inputs are JSON Lines (.jsonl / .jsonl.gz, a `text` field) or plain text (one text per line);
`--input` is repeatable and takes globs.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, Optional

import typer

from factory.stage import UserError

INPUT_HELP = "JSON Lines (.jsonl[.gz], `text` field) or plain text file; repeatable; globs ok."
TEXT_FIELD_HELP = "The JSON field holding the text."


def expand_inputs(patterns: list[str]) -> list[Path]:
    """The files named by `patterns` (globs expanded, sorted, duplicates dropped)."""
    files: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        hits = [h for h in hits if Path(h).is_file()]
        if not hits:
            raise UserError(f"--input {pat}: no such file (or the glob matches none)")
        files += [Path(h) for h in hits if Path(h) not in files]
    return files


def stream_texts(files: list[Path], text_field: str) -> Iterator[str]:
    from tokenization.io import read_texts

    for f in files:
        yield from read_texts(f, text_field)


def register(app: typer.Typer) -> None:
    """Add the `vocab` group to the `factory` app."""
    vocab = typer.Typer(no_args_is_help=True, help="Vocabulary building: train, extend, report.")
    app.add_typer(vocab, name="vocab")

    @vocab.command("train")
    def train(
        kind: str = typer.Option(..., help="wordpiece | bpe | byte_bpe | unigram"),
        vocab_size: int = typer.Option(..., help="Entries, special tokens included."),
        input: list[str] = typer.Option(..., help=INPUT_HELP),
        output: Path = typer.Option(..., help="Tokenizer folder to write (AutoTokenizer "
                                    "loads it)."),
        casing: str = typer.Option("uncased", help="uncased (lowercase; wordpiece also strips "
                                   "accents) | cased"),
        min_frequency: Optional[int] = typer.Option(
            None, help="Minimum count of a merge / piece (default 2; not for unigram)."),
        text_field: str = typer.Option("text", help=TEXT_FIELD_HELP),
        model_max_length: int = typer.Option(512, help="transformers' default truncation."),
        strip_accents: Optional[bool] = typer.Option(
            None, "--strip-accents/--keep-accents",
            help="Default: strip for uncased wordpiece only (BERT's rule)."),
        special_token: list[str] = typer.Option(
            [], help="Extra special token (repeatable); ids right after the kind's own."),
        split_digits: bool = typer.Option(False, help="Each digit its own token (not wordpiece)."),
        sentencepiece: bool = typer.Option(False, help="unigram only: train with Google's "
                                           "sentencepiece (same output format)."),
    ) -> None:
        """Train a vocabulary with Hugging Face `tokenizers`, streaming the input."""
        import time

        from tokenization.train import KINDS, TrainOptions, save_tokenizer, train_tokenizer

        if kind not in KINDS:
            raise UserError(f"--kind {kind}: one of {', '.join(KINDS)}")
        if casing not in ("cased", "uncased"):
            raise UserError(f"--casing {casing}: one of cased, uncased")
        if min_frequency is not None and kind == "unigram":
            raise UserError("--min-frequency: a unigram vocabulary is pruned by likelihood, not "
                            "by count; remove it")
        min_frequency = 2 if min_frequency is None else min_frequency
        files = expand_inputs(input)
        start = time.perf_counter()
        options = TrainOptions(strip_accents=strip_accents,
                               special_tokens=tuple(special_token), split_digits=split_digits)
        if sentencepiece:
            if kind != "unigram":
                raise UserError(f"--sentencepiece: not supported yet for {kind} (only unigram)")
            from tokenization.sentencepiece_train import train_sentencepiece

            tok = train_sentencepiece(vocab_size, casing, stream_texts(files, text_field),
                                      options)
        else:
            tok = train_tokenizer(kind, vocab_size, casing, min_frequency,
                                  stream_texts(files, text_field), options)
        out = save_tokenizer(tok, kind, output, model_max_length=model_max_length,
                             casing=casing)
        typer.echo(f"{out}: {kind} tokenizer, {tok.get_vocab_size()} entries, trained on "
                   f"{len(files)} file(s) in {time.perf_counter() - start:.1f} s")

    @vocab.command("extend")
    def extend(
        base: Path = typer.Option(..., help="Base tokenizer folder or tokenizer.json."),
        input: list[str] = typer.Option(..., help=INPUT_HELP),
        add: int = typer.Option(..., help="Number of vocabulary entries to add."),
        output: Path = typer.Option(..., help="Extended tokenizer folder to write."),
        min_count: int = typer.Option(2, help="Ignore words seen fewer times."),
        text_field: str = typer.Option("text", help=TEXT_FIELD_HELP),
        model_output: Optional[Path] = typer.Option(
            None, help="Also write the base MODEL (a HF folder at --base) with its embeddings "
            "resized (padded to 128) and the new rows initialised, here."),
    ) -> None:
        """Add the entries that most reduce fragmentation of the input; base ids unchanged."""
        from tokenization.extend import extend_tokenizer, extension_info, save_extension

        files = expand_inputs(input)
        ext = extend_tokenizer(base, stream_texts(files, text_field), add, min_count=min_count)
        out = save_extension(ext, base, output)
        info = extension_info(ext, Path(base).resolve())
        (out / "extension.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"{out}: {ext.base_size} + {len(ext.added)} entries; tokens on the input "
                   f"{ext.corpus['tokens']:,} -> {ext.corpus['tokens_after']:,} "
                   f"(list: {out / 'added_tokens.tsv'})")
        if model_output is not None:
            from tokenization.embeddings import extend_hf_model

            extend_hf_model(base, out, model_output)
            typer.echo(f"{model_output}: base model with the extended embeddings")

    @vocab.command("report")
    def report(
        tokenizer: Path = typer.Option(..., help="Tokenizer folder or tokenizer.json."),
        baseline: Path = typer.Option(..., help="Tokenizer to compare with."),
        text: Path = typer.Option(..., help="JSON Lines (.gz) with a `text` field, or plain text."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers here."),
        plot: Optional[Path] = typer.Option(None, help="Write a PNG bar plot here."),
        text_field: str = typer.Option("text", help=TEXT_FIELD_HELP),
    ) -> None:
        """Fertility, words split, pieces per split word, top-1000 coverage: A vs baseline."""
        from tokenization.io import read_texts
        from tokenization.report import bar_plot, compare, markdown_table
        from tokenization.train import load_backend

        toks = {"tokenizer": load_backend(tokenizer)[0], "baseline": load_backend(baseline)[0]}
        texts = list(read_texts(text, text_field))
        if not texts:
            raise UserError(f"{text}: no text in it (a .jsonl needs a non-empty "
                            f"`{text_field}` field)")
        results = compare(toks, {text.name: texts})
        row = results[text.name]
        typer.echo(markdown_table(results), nl=False)
        if json_out is not None:
            keys = ("fertility", "split_share", "pieces_per_split_word", "coverage_top1000")
            doc = {name: {k: row[name][k] for k in keys} for name in toks}
            doc["words"] = row["tokenizer"]["words"]
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if plot is not None:
            plot.parent.mkdir(parents=True, exist_ok=True)
            bar_plot(results, plot, title=f"{tokenizer.name} vs {baseline.name}")
