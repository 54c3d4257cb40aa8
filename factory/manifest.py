"""The domain manifest: pydantic models of the YAML, named scales, dotted overrides.

`load(path, scale=..., overrides=[...])` returns a validated `Manifest` or raises
`ManifestError`, whose lines read `FILE:LINE FIELD.PATH: message` so a user can jump to
the mistake. A field is either used by the run or rejected: nothing is accepted and ignored.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.bench.ner import NerOptions
from factory.corpus.options import (Decontaminate, Executor, Filters, NearDedup, Phase,
                                     check_phases)
from factory.train.sizes import SIZES

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ManifestError(Exception):
    """One or more problems, each a ready-to-print line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections --------------------------------------------------------------------------


class BaseCheckpoint(_Strict):
    path: str = Field(description="Local HF folder, HF hub id, or package:MODULE/SUBDIR")


SCRATCH_DROPOUT = 0.1     # BERT's and GPT-2's
DROPOUT_DEFAULT = (f"unset: {SCRATCH_DROPOUT} from scratch; continued runs keep the base "
                   "checkpoint's own (0.1 for BERT, 0 for Llama)")


class ModelSpec(_Strict):
    size: str | None = Field(None, description="A preset of factory/train/sizes.py")
    num_layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    ffn_hidden_size: int | None = Field(None, gt=0)
    num_query_groups: int | None = Field(None, gt=0, description="GQA groups (gpt only)")
    hidden_dropout: float | None = Field(None, ge=0, lt=1, description=DROPOUT_DEFAULT)
    attention_dropout: float | None = Field(None, ge=0, lt=1, description=DROPOUT_DEFAULT)


class VocabExtension(_Strict):
    add: int = Field(gt=0, description="Entries appended to the base tokenizer (base ids kept)")
    min_count: int = Field(2, ge=1, description="Ignore domain words seen fewer times")


class TokenizerSpec(_Strict):
    """A vocabulary trained on the corpus (scratch: kind + vocab_size) or the base's
    vocabulary extended with domain words (continued: extend)."""

    kind: Literal["wordpiece", "bpe", "byte_bpe", "unigram"] | None = None
    vocab_size: int | None = Field(None, gt=0)
    casing: Literal["uncased", "cased"] = "uncased"
    min_frequency: int = Field(2, ge=1)
    extend: VocabExtension | None = Field(
        None, description="Continued runs: add the domain words that most reduce fragmentation")
    baseline: str | None = Field(
        None, description="Tokenizer the vocab report compares with: a folder, tokenizer.json, "
        "package:MODULE/SUBDIR or hub id")
    strip_accents: bool | None = Field(
        None, description="Remove accents (default: only for uncased wordpiece, as BERT does)")
    special_tokens: list[str] = Field(
        [], description="Extra special tokens, ids right after the kind's own")
    split_digits: bool = Field(False, description="Each digit its own token (not wordpiece)")
    sentencepiece: bool = Field(
        False, description="Train the unigram vocabulary with Google's sentencepiece")

    @model_validator(mode="after")
    def _train_or_extend(self):
        if self.extend is None:
            missing = [f for f in ("kind", "vocab_size") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"give {' and '.join(missing)} (or `extend: {{add: K}}` in a "
                                 "continued run)")
        else:
            given = sorted({"kind", "vocab_size", "casing", "min_frequency", "strip_accents",
                            "special_tokens", "split_digits", "sentencepiece"}
                           & self.model_fields_set)
            if given:
                raise ValueError(f"extend keeps the base tokenizer's pipeline; remove "
                                 f"{', '.join(given)}")
        if self.split_digits and self.kind == "wordpiece":
            raise ValueError("split_digits: not supported yet for wordpiece (transformers' BERT "
                             "tokenizer rebuilds its own pre-tokeniser); use bpe, byte_bpe or "
                             "unigram")
        if self.sentencepiece and self.kind != "unigram":
            raise ValueError(f"sentencepiece: not supported yet for {self.kind} (only unigram)")
        if self.kind == "unigram" and "min_frequency" in self.model_fields_set:
            raise ValueError("min_frequency: a unigram vocabulary is pruned by likelihood, not "
                             "by count; remove it")
        if any(not t or t != t.strip() for t in self.special_tokens) or len(
                set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("special_tokens: non-empty strings without surrounding spaces, "
                             "each once")
        return self


class HFDatasetSpec(_Strict):
    id: str = Field(description="Hub id or local dataset folder")
    split: str = "train"
    config: str | None = None


class _SourceBase(_Strict):
    path: str | None = Field(None, description="Files or a glob: JSON Lines (.jsonl/.json, "
                             ".gz/.zst), Parquet (.parquet) or plain text (.txt, .gz/.zst)")
    hf_dataset: HFDatasetSpec | None = None
    text_field: str = "text"
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="auto: from the file names")
    text_unit: Literal["file", "line"] = Field(
        "file", description="Plain text only: a document per file or per non-empty line")
    filters: Filters | None = Field(None, description="This source's quality filters "
                                    "(default: corpus.filters)")

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of `path` or `hf_dataset`")
        if self.hf_dataset is not None and self.format != "auto":
            raise ValueError("`format` is for `path` sources")
        if self.text_unit != "file" and self.format not in ("text", "auto"):
            raise ValueError("`text_unit` is for plain text sources")
        return self


class Source(_SourceBase):
    name: str = Field(pattern=NAME)
    weight: float = Field(1.0, gt=0, description="Sampling probability (normalised over sources)")
    epochs: float | None = Field(None, gt=0, description="Repeat this source exactly this many "
                                 "times over the planned tokens instead of sampling by weight")

    @model_validator(mode="after")
    def _weight_or_epochs(self):
        if self.epochs is not None and "weight" in self.model_fields_set:
            raise ValueError("give `weight` or `epochs`, not both")
        return self


class HeldoutSource(_SourceBase):
    pass


class Corpus(_Strict):
    sources: list[Source] = Field(min_length=1)
    heldout: HeldoutSource | None = Field(None, description="Explicit held-out text")
    heldout_fraction: float = Field(0.01, gt=0, lt=0.5,
                                    description="Held-out share when `heldout` is not given")
    min_words: int = Field(5, ge=0)
    exact_dedup: bool = True
    filters: Filters = Field(Filters(), description="Quality filters of every source")
    near_dedup: NearDedup | None = Field(None, description="MinHash near-dedup; {} = defaults")
    decontaminate: Decontaminate | None = Field(
        Decontaminate(), description="Benchmark decontamination; null turns it off")
    executor: Executor = Executor()
    phases: list[Phase] = Field([], description="Source weights per stretch of training")
    repeat_warning: float = Field(4.0, gt=0, description="Warn when a source would be "
                                  "repeated more than this many epochs")
    general_text: str | None = Field(
        None, description="General-language held-out text (JSON Lines, `text` field): the "
        "vocabulary report's out-of-domain numbers, the pack's general_heldout split "
        "(val_general_loss, the forgetting curve) and factory compare's general loss. Default: "
        "the shipped English sample (domains/general); give one in the model's language for a "
        "non-English domain")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources):
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dup)}")
        return sources

    @model_validator(mode="after")
    def _blend(self):
        problems = check_phases(self.phases, [s.name for s in self.sources])
        if self.phases and any(s.epochs is not None for s in self.sources):
            problems.append("give sources `epochs` or `phases`, not both")
        if problems:
            raise ValueError("phases: " + "; ".join(problems))
        return self


class Optimizer(_Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)


class Schedule(_Strict):
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)
    decay: Literal["linear", "cosine", "constant", "wsd"] = Field(
        "linear", description="wsd = warmup-stable-decay (MiniCPM, arXiv:2404.06395)")
    min_lr: float = Field(0.0, ge=0)
    decay_fraction: float | None = Field(
        None, gt=0, le=1, description="wsd only: share of the steps after warmup spent decaying "
        "(default 0.2)")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("give warmup_steps or warmup_fraction, not both")
        if self.decay_fraction is not None and self.decay != "wsd":
            raise ValueError("decay_fraction is for decay: wsd only")
        return self


class Training(_Strict):
    seq_length: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0, description="Budget; steps = ceil(tokens / (batch * seq))")
    lr: float = Field(gt=0)
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    clip_grad: float = Field(1.0, ge=0, description="0 turns clipping off")
    seed: int = 1234
    checkpoint_interval: int = Field(gt=0)
    log_interval: int = Field(10, gt=0)
    mask_prob: float | None = Field(None, gt=0, lt=1, description="Masked-LM share (bert only)")
    whole_word_masking: bool | None = Field(
        None, description="Mask every piece of a chosen word (bert only; default true)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU; bf16 keeps fp32 master weights")
    recompute: Literal["none", "selective", "full"] = Field(
        "none", description="activation recomputation: selective = core attention, full = "
                            "every layer (least memory, about a third more compute)")
    eval_interval: int | None = Field(
        None, gt=0, description="every N steps and at the last: the loss on eval_samples fixed "
                                "held-out sequences of the domain (pack/heldout: val_loss, "
                                "val_ppl) and of corpus.general_text (pack/general_heldout: "
                                "val_general_loss, val_general_ppl), as Megatron-LM's "
                                "--eval-interval; null: off")
    eval_samples: int = Field(
        64, gt=0, description="held-out sequences per evaluation, rounded up to whole "
                              "global batches (the same under any parallel layout)")
    compile: bool = Field(
        False, description="torch.compile each transformer layer (fused elementwise kernels, "
                           "fewer launches); the first step compiles; on CPU it needs a C++ "
                           "compiler. Dropout masks differ from an uncompiled run's")

    @model_validator(mode="after")
    def _budget(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of `steps` or `tokens`")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size {self.micro_batch_size}")
        return self

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.global_batch_size * self.seq_length))

    @property
    def warmup_steps(self) -> int:
        s = self.schedule
        if s.warmup_steps is not None:
            return s.warmup_steps
        return int(round((s.warmup_fraction or 0.0) * self.total_steps))


class Parallel(_Strict):
    """Model-parallel layout; data parallel = world size / (tensor * pipeline), from torchrun."""

    tensor: int = Field(1, gt=0, description="Tensor-parallel size (must divide the heads)")
    pipeline: int = Field(1, gt=0, description="Pipeline-parallel size (must divide the layers)")
    sequence_parallel: bool = Field(
        False, description="With tensor > 1: norms, dropouts and residual adds hold 1/tensor "
                           "of the sequence each (less activation memory); seq_length must "
                           "divide by tensor")
    virtual_pipeline: int = Field(
        1, gt=0, description="Model chunks per pipeline rank (interleaved 1F1B: a smaller "
                             "pipeline bubble); pipeline x virtual_pipeline must divide the "
                             "layers")
    engine: Literal["auto", "torch", "megatron"] = Field(
        "auto", description="torch: fp32 weights, torch AdamW, bf16 autocast, one gradient "
        "all-reduce after backward. megatron: megatron-core DDP (bucketed reduce overlapped "
        "with backward) and optimizer (bf16 weights with fp32 main weights, distributed "
        "optimizer). auto: megatron on GPUs with data parallel > 1 (and for bf16 on CPU), "
        "torch otherwise; a resumed run keeps its checkpoint's engine")
    distributed_optimizer: bool | None = Field(
        None, description="engine megatron: shard main weights and Adam state over the "
                          "data-parallel ranks (default true)")
    overlap_grad_reduce: bool | None = Field(
        None, description="engine megatron: start each bucket's reduce during backward "
                          "(default true)")
    ddp_bucket_size: int | None = Field(
        None, gt=0, description="engine megatron: gradient elements per reduce bucket "
                                "(default megatron's, max(40M, 1M x data parallel))")

    @model_validator(mode="after")
    def _engine_options(self):
        if self.engine != "megatron":
            given = [f for f in ("distributed_optimizer", "overlap_grad_reduce",
                                 "ddp_bucket_size") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for engine: megatron; set "
                                 "parallel.engine: megatron or remove them")
        return self


class Task(NerOptions):
    """A benchmark task: where its data is, plus its fine-tuning settings (NerOptions)."""

    name: str = Field(pattern=NAME)
    kind: Literal["ner"]
    data: str = Field(description="Folder with train.tsv, devel.tsv, test.tsv (token<TAB>IOB tag)")


class SuiteRun(_Strict):
    """A benchmark suite (factory.bench.suites) run on the exported model."""

    suite: Literal["blurb", "lexglue", "maltese", "finance", "code", "stackoverflow"]
    tasks: list[str] | None = Field(None, description="Task names (default: all with data)")
    data: str | None = Field(None, description="Folder with one sub-folder per task "
                                               "(default: the shared benchmarks folder)")
    seeds: list[int] = Field([42], min_length=1)
    max_train_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0, description="Overrides the suite's defaults")
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    max_seq_length: int | None = Field(None, gt=8)

    @model_validator(mode="after")
    def _known_tasks(self):
        from factory.bench.suites import SUITES

        known = {n.lower() for n in SUITES[self.suite].tasks}
        bad = [t for t in self.tasks or [] if t.lower() not in known]
        if bad:
            raise ValueError(f"suite {self.suite} has no task {', '.join(bad)}; its tasks: "
                             f"{', '.join(SUITES[self.suite].tasks)}")
        return self


class Evaluation(_Strict):
    heldout_loss: bool = True
    heldout_max_docs: int | None = Field(1000, gt=0)
    tasks: list[Task] = []
    suites: list[SuiteRun] = []


class Manifest(_Strict):
    name: str = Field(pattern=NAME)
    description: str | None = None
    family: Literal["bert", "gpt"]
    strategy: Literal["scratch", "continued"] = "scratch"
    base: BaseCheckpoint | None = None
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec | None = None
    corpus: Corpus
    training: Training
    parallel: Parallel = Parallel()
    evaluation: Evaluation = Evaluation()

    @model_validator(mode="after")
    def _coherent(self):
        problems: list[tuple[str, str]] = []
        m = self.model
        if self.strategy == "continued":
            if self.base is None:
                problems.append(("base", "a continued run needs `base: {path: ...}`"))
            if self.tokenizer is not None and self.tokenizer.extend is None:
                problems.append(("tokenizer", "a continued run reuses the base tokenizer; "
                                 "remove this section, or give only `extend: {add: K}`"))
            for f in ("size", "num_layers", "hidden_size", "num_attention_heads",
                      "ffn_hidden_size", "num_query_groups"):
                if getattr(m, f) is not None:
                    problems.append((f"model.{f}", "a continued run takes its dimensions "
                                     "from the base checkpoint; remove it"))
        else:
            if self.base is not None:
                problems.append(("base", "only a continued run takes a base checkpoint "
                                 "(set strategy: continued)"))
            if self.tokenizer is None:
                problems.append(("tokenizer", "a scratch run trains a vocabulary: add "
                                 "`tokenizer: {kind: ..., vocab_size: ...}`"))
            presets = SIZES[self.family]
            if m.size is not None and m.size not in presets:
                problems.append(("model.size", f"unknown size {m.size!r} for {self.family}; "
                                 f"one of: {', '.join(presets)}"))
            elif m.size is None:
                need = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"]
                missing = [f for f in need if getattr(m, f) is None]
                if missing:
                    problems.append(("model", "give `size` or all of " + ", ".join(missing)))
            if not problems:
                dims = self.model_dims
                if dims["hidden_size"] % dims["num_attention_heads"]:
                    problems.append(("model.num_attention_heads",
                                     "must divide hidden_size"))
                if self.family == "gpt":
                    g = dims.get("num_query_groups") or dims["num_attention_heads"]
                    if dims["num_attention_heads"] % g:
                        problems.append(("model.num_query_groups",
                                         "must divide num_attention_heads"))
        if self.family == "bert" and m.num_query_groups is not None:
            problems.append(("model.num_query_groups", "only for family gpt"))
        if self.strategy == "scratch" and self.tokenizer is not None \
                and self.tokenizer.extend is not None:
            problems.append(("tokenizer.extend", "only a continued run extends a base "
                             "vocabulary; give kind and vocab_size to train one"))
        if self.tokenizer is not None and self.tokenizer.kind is not None:
            kind = self.tokenizer.kind
            if self.family == "bert" and kind != "wordpiece":
                problems.append(("tokenizer.kind", f"{kind} for bert: not supported yet "
                                 "(whole-word masking needs WordPiece); use wordpiece"))
            if self.family == "gpt" and kind == "wordpiece":
                problems.append(("tokenizer.kind", "gpt needs bpe, byte_bpe or unigram"))
        for f in ("mask_prob", "whole_word_masking"):
            if self.family == "gpt" and getattr(self.training, f) is not None:
                problems.append((f"training.{f}", "only for family bert"))
        if problems:
            raise _Problems(problems)
        return self

    @property
    def model_dims(self) -> dict[str, int]:
        """Preset merged with explicit dimensions (scratch runs)."""
        dims = dict(SIZES[self.family].get(self.model.size or "", {}))
        for f in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "num_query_groups"):
            v = getattr(self.model, f)
            if v is not None:
                dims[f] = v
        return dims

    @property
    def mask_prob(self) -> float:
        return self.training.mask_prob if self.training.mask_prob is not None else 0.15


class _Problems(ValueError):
    """Several located problems from one validator, split apart again in `_format`."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


# --- loading ---------------------------------------------------------------------------


class Loaded:
    """A validated manifest with where it came from."""

    def __init__(self, manifest: Manifest, path: Path, scale: str | None,
                 overrides: list[str], raw: dict):
        self.manifest = manifest
        self.path = path
        self.root = path.resolve().parent
        self.scale = scale
        self.overrides = overrides
        self.raw = raw

    def resolve(self, p: str) -> Path:
        """A path of the manifest, relative to the manifest's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.root / q).resolve()

    def resolved(self) -> dict:
        """The resolved manifest as recorded in the run: merged scale, overrides applied."""
        d = self.manifest.model_dump(mode="json", exclude_none=True)
        d["_resolved"] = {"source": str(self.path.resolve()), "scale": self.scale,
                          "overrides": list(self.overrides)}
        return d


def load(path: str | Path, scale: str | None = None,
         overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"{shown}: no such manifest file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([f"{shown}: cannot read manifest ({e.__class__.__name__}: {e})"]) from None
    try:
        raw = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        msg = getattr(e, "problem", None) or str(e)
        raise ManifestError([f"{shown}{line} (yaml): {msg}"]) from None
    if not isinstance(raw, dict):
        raise ManifestError([f"{shown}:1 (root): a manifest is a mapping of fields"])
    lines = _line_map(node)

    scales = raw.pop("scales", None) or {}
    if not isinstance(scales, dict):
        raise ManifestError([f"{shown}:{lines.get(('scales',), 1)} scales: must be a mapping "
                             "of scale name -> overrides"])
    origin = {k: (shown, v) for k, v in lines.items() if not k or k[0] != "scales"}
    data = copy.deepcopy(raw)
    if scale is not None:
        if scale not in scales:
            known = ", ".join(scales) or "none defined"
            raise ManifestError([f"{shown}: unknown scale {scale!r} (scales: {known})"])
        over = scales[scale] or {}
        if not isinstance(over, dict):
            ln = lines.get(("scales", scale), 1)
            raise ManifestError([f"{shown}:{ln} scales.{scale}: must be a mapping of overrides"])
        _merge(data, over, origin, prefix=(), src_prefix=("scales", scale), lines=lines,
               shown=shown)

    problems = []
    for i, item in enumerate(overrides, 1):
        try:
            key, value = _parse_set(item)
        except ValueError as e:
            problems.append(f"--set:{i} {item}: {e}")
            continue
        _set_path(data, key, value)
        for k in [k for k in origin if k[:len(key)] == key]:
            del origin[k]
        origin[key] = ("--set", i)
    if problems:
        raise ManifestError(problems)

    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_format(e, origin, shown)) from None
    return Loaded(manifest, path, scale, list(overrides), data)


def scales_of(path: str | Path) -> list[str]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    s = raw.get("scales") if isinstance(raw, dict) else None
    return list(s) if isinstance(s, dict) else []


def _line_map(node, prefix: tuple = ()) -> dict[tuple, int]:
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out.update(_line_map(v, key))
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_line_map(v, prefix + (i,)))
    return out


def _merge(dst: dict, src: dict, origin: dict, prefix: tuple, src_prefix: tuple,
           lines: dict, shown: str) -> None:
    """Deep-merge a scale override; a list (or scalar) in the override replaces the value."""
    for k, v in src.items():
        key = prefix + (k,)
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, origin, key, src_prefix, lines, shown)
            continue
        dst[k] = copy.deepcopy(v)
        for o in [o for o in origin if o[:len(key)] == key]:
            del origin[o]
        for src_key, ln in lines.items():
            full = src_prefix + key
            if src_key[:len(full)] == full:
                origin[key + src_key[len(full):]] = (shown, ln)


def _parse_set(item: str) -> tuple[tuple, Any]:
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, value = item.split("=", 1)
    parts: list[Any] = []
    for seg in key.strip().split("."):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)", seg)
        if seg.isdigit():
            parts.append(int(seg))
        elif m:
            parts.append(m.group(1))
            parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
        else:
            raise ValueError(f"bad key segment {seg!r}")
    if not parts:
        raise ValueError("empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(parts), parsed


def _set_path(data: dict, key: tuple, value: Any) -> None:
    cur: Any = data
    for i, part in enumerate(key[:-1]):
        nxt = key[i + 1]
        if isinstance(part, int):
            if not isinstance(cur, list) or part >= len(cur):
                raise ManifestError([f"--set {'.'.join(map(str, key))}: index {part} out of range"])
            cur = cur[part]
            continue
        if not isinstance(cur.get(part), (dict, list)):
            cur[part] = [] if isinstance(nxt, int) else {}
        cur = cur[part]
    last = key[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last >= len(cur):
            raise ManifestError([f"--set {'.'.join(map(str, key))}: index {last} out of range"])
    cur[last] = value


def _dotted(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


_FIELDS_OF: dict[tuple, type[BaseModel]] = {}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for 'did you mean' hints)."""
    model: Any = Manifest
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        field = model.model_fields.get(p) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        cands = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        for a in args:
            cands += [b for b in getattr(a, "__args__", ()) if isinstance(b, type)
                      and issubclass(b, BaseModel)]
        if not cands:
            return None
        model = cands[0]
    return model


def _message(err: dict) -> str:
    t, ctx, loc = err["type"], err.get("ctx") or {}, err["loc"]
    if t == "extra_forbidden":
        owner = _model_at(loc)
        allowed = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field{hint} (allowed: {', '.join(allowed)})" if allowed else "unknown field"
    if t == "missing":
        return "required field is missing"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if t == "string_pattern_mismatch":
        return "must start with a letter or digit and use only letters, digits, '_', '-', '.'"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _format(e: ValidationError, origin: dict, shown: str) -> list[str]:
    out = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
            p.startswith("function-") or p in ("tagged-union",))))
        # Union arms (e.g. `HFDatasetSpec | None`) add the arm's class name to loc.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
        exc = (err.get("ctx") or {}).get("error")
        pairs = ([(tuple(_split(p)), m) for p, m in exc.problems]
                 if isinstance(exc, _Problems) else [((), _message(err))])
        for sub, msg in pairs:
            full = loc + sub
            where = _locate(full, origin, shown)
            out.append(f"{where} {_dotted(full)}: {msg}")
    return out


def _split(dotted: str) -> list:
    return [int(p) if p.isdigit() else p for p in dotted.split(".")]


def _locate(loc: tuple, origin: dict, shown: str) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in origin:
            src, ln = origin[loc[:n]]
            return f"{src}:{ln}"
    return f"{shown}:1"
