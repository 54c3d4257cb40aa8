"""The pretrain stage: megatron-core training from scratch or from a Hugging Face base.

Reads vocab/tokenizer and pack/; writes model.json, checkpoints/ and metrics.jsonl (pretrain/
contract). The runner hands a killed attempt's folder back to the rerun of the same config, so
`run` resumes from the newest complete checkpoint there: model, optimizer and every RNG restored,
the data position recomputed from the step (samples are a function of their index), metrics.jsonl
cut back to the checkpoint and replayed to the tracker. The rerun's losses equal an uninterrupted
run's.

Multi-process (torchrun): `run` is called on every rank with the same ctx.out (a shared
filesystem). The manifest's `parallel:` section sets tensor/pipeline sizes, data parallel is
the rest of the world. Global rank 0 alone writes model.json and metrics.jsonl and logs to
ctx.log; checkpoints are collective (each rank writes its shards and extra/rankNNNNN.pt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from factory.corpus.blend import BlendSpec
from factory.manifest import SCRATCH_DROPOUT, Parallel, Training
from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded
    from factory.train.models import ModelConfig

log = logging.getLogger(__name__)

GPT_LAYERNORM_EPSILON = 1e-5   # Llama's rms_norm_eps
EXTENDED_BASE = "extended_base"  # under ctx.out: the base with an extended vocabulary


class PretrainConfig(StageConfig):
    family: Literal["bert", "gpt"]
    strategy: Literal["scratch", "continued"]
    model_dims: dict[str, int] | None = Field(
        None, description="num_layers, hidden_size, ... (scratch); None when continued")
    hidden_dropout: float | None = Field(description="None: the base checkpoint's (continued)")
    attention_dropout: float | None = Field(description="None: the base checkpoint's (continued)")
    base: str | None = Field(None, description="Resolved base HF folder (continued)")
    training: Training
    steps: int = Field(gt=0, description="training.total_steps")
    warmup_steps: int = Field(ge=0, description="training.warmup_steps")
    mask_prob: float | None = Field(None, description="Masked-LM share (bert)")
    parallel: Parallel = Parallel()
    blend: BlendSpec | None = Field(None, description="corpus weights/epochs/phases; None: "
                                   "the pack.json weights, one phase")


class PretrainStage(Stage):
    name = "pretrain"
    Config = PretrainConfig

    @classmethod
    def from_manifest(cls, loaded: "Loaded") -> "PretrainStage":
        m = loaded.manifest
        base = None
        if m.strategy == "continued":
            from factory import base_checkpoint

            base = str(base_checkpoint.resolve(m.base.path, loaded.root))
        return cls(PretrainConfig(
            family=m.family, strategy=m.strategy,
            model_dims=m.model_dims if m.strategy == "scratch" else None,
            hidden_dropout=_dropout(m.model.hidden_dropout, m.strategy),
            attention_dropout=_dropout(m.model.attention_dropout, m.strategy),
            base=base, training=m.training, steps=m.training.total_steps,
            warmup_steps=m.training.warmup_steps,
            mask_prob=m.mask_prob if m.family == "bert" else None, parallel=m.parallel,
            blend=BlendSpec.from_corpus(m.corpus)))

    def check(self) -> list[str]:
        c = self.config
        t = c.training
        problems = []
        if t.global_batch_size % t.micro_batch_size:
            problems.append(f"training.global_batch_size {t.global_batch_size} must be a "
                            f"multiple of training.micro_batch_size {t.micro_batch_size}")
        if c.warmup_steps > c.steps:
            problems.append(f"training.schedule: warmup ({c.warmup_steps} steps) exceeds the "
                            f"run ({c.steps} steps); shorten the warmup")
        if c.strategy == "scratch" and c.model_dims:
            problems += self._layout_problems(c.model_dims.get("num_attention_heads", 1),
                                              c.model_dims.get("num_query_groups"),
                                              c.model_dims.get("num_layers"))
        if c.strategy == "continued":
            base = Path(c.base or "")
            if not (base / "config.json").is_file():
                problems.append(f"base.path: {base} has no config.json (not a Hugging Face "
                                "model folder)")
            elif not _weights(base):
                problems.append(f"base.path: {base} has no *.safetensors weights (the factory "
                                "loads safetensors only; convert the checkpoint first)")
            else:
                try:
                    problems += self._check_base_fits(base)
                except UserError as e:
                    problems.append(str(e))
        return problems

    def _check_base_fits(self, base: Path) -> list[str]:
        from factory.train.models import config_from_hf

        cfg = config_from_hf(base)
        if cfg.family != self.config.family:
            return [f"base.path: {base} is a {cfg.family} checkpoint but family is "
                    f"{self.config.family}; fix `family` or the base"]
        if cfg.family == "bert" and self.config.training.seq_length > cfg.max_position_embeddings:
            return [f"training.seq_length {self.config.training.seq_length} exceeds the base's "
                    f"max_position_embeddings {cfg.max_position_embeddings}; lower it"]
        return self._layout_problems(cfg.num_attention_heads, cfg.num_query_groups,
                                     cfg.num_layers)

    def _layout_problems(self, heads: int, groups: int | None, layers: int | None
                         ) -> list[str]:
        from factory.train.parallel import layout_problems

        return layout_problems(self._layout(), self.config.family, heads, groups, layers,
                               self.config.training.seq_length)

    def _layout(self):
        from factory.train.parallel import Layout

        p = self.config.parallel
        return Layout(tensor_parallel=p.tensor, pipeline_parallel=p.pipeline,
                      virtual_pipeline=p.virtual_pipeline,
                      sequence_parallel=p.sequence_parallel)

    def fingerprint(self) -> dict[str, str]:
        if self.config.strategy != "continued" or not self.config.base:
            return {}
        return {"base_weights": file_digest(_weights(Path(self.config.base)))}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from factory.train import checkpoint, compiled, data, engine, loop, parallel
        from factory.train.models import build_model

        c = self.config
        t = c.training
        layout = self._layout()
        world = parallel.world_size()
        try:
            dp = layout.data_parallel(world)
        except ValueError as e:
            raise UserError(f"parallel: {e}; launch torchrun with a multiple of "
                            f"{layout.tensor_parallel * layout.pipeline_parallel} processes"
                            ) from None
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise UserError(f"training.global_batch_size {t.global_batch_size} must be a "
                            f"multiple of micro_batch_size x data-parallel size = "
                            f"{t.micro_batch_size} x {dp}")
        self._refuse_bf16_without_cuda(self._engine(dp, saved=None))    # before any work
        if t.compile:
            compiled.check_available()
        parallel.init(layout, seed=t.seed)
        writer = loop.is_writer()
        tokenizer = data.load_tokenizer(ctx.inputs["vocab"] / "tokenizer")
        pack_dir = ctx.inputs["pack"]
        self._check_pack(pack_dir, tokenizer.vocab_size)
        base = self._base_folder(ctx, writer)
        model_cfg = self._model_config(tokenizer.vocab_size, base)
        problems = self._layout_problems(model_cfg.num_attention_heads,
                                         model_cfg.num_query_groups, model_cfg.num_layers)
        if problems:
            raise UserError("; ".join(problems))

        ckpt_root = ctx.out / "checkpoints"
        if writer:
            checkpoint.sweep_incomplete(ckpt_root)
        parallel.barrier()
        resume_step = checkpoint.latest_step(ckpt_root)
        engine_name = self._engine(dp, None if resume_step is None
                                   else checkpoint.engine_of(ckpt_root, resume_step))
        self._refuse_bf16_without_cuda(engine_name)
        if writer:
            (ctx.out / "model.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
            ctx.log.params({f"model.{k}": v for k, v in model_cfg.to_dict().items()})
            # The manifest holds tensor/pipeline sizes; data parallel is what torchrun gave.
            ctx.log.params({"layout.world_size": world, "layout.data_parallel": dp,
                            "layout.engine": engine_name})

        model = build_model(model_cfg, t.recompute, c.parallel.sequence_parallel)
        n_params = sum(p.numel() for p in model.parameters())    # tied weights count once
        log.info("%s model: %.2fM parameters on this rank (tensor parallel %d, data parallel "
                 "%d)", c.family, n_params / 1e6, layout.tensor_parallel, dp)
        loaded = c.strategy == "continued" and resume_step is None
        if loaded:
            from factory.train.convert import load_hf_into_megatron

            load_hf_into_megatron(model, base, model_cfg)
        cfg = self._loop_config(model_cfg, engine_name)
        model, optimizer = engine.build(model, engine.config_of(
            cfg.engine, cfg.precision, t, c.parallel), loaded_weights=loaded)
        if t.compile:
            compiled.compile_layers(model)
        plan = self._blend_plan(ctx, pack_dir, writer)
        train_data = data.build_train_dataset(
            c.family, pack_dir, tokenizer, t.seq_length, c.steps * t.global_batch_size,
            t.seed, ctx.out / "data_cache", mask_prob=c.mask_prob or 0.15,
            whole_word_masking=t.whole_word_masking is not False, plan=plan)
        # val: the domain's held-out split; val_general: the general text (corpus.general_text,
        # forgetting), in packs that hold it.
        splits = {"val": "heldout"}
        if "general_heldout" in data.heldout_splits(pack_dir):
            splits["val_general"] = "general_heldout"
        eval_data = {name: data.build_heldout_dataset(
            c.family, pack_dir, tokenizer, t.seq_length, cfg.eval_samples, t.seed,
            ctx.out / "data_cache", mask_prob=c.mask_prob or 0.15,
            whole_word_masking=t.whole_word_masking is not False, split=split)
            for name, split in splits.items()} if t.eval_interval else {}

        metrics_path = ctx.out / "metrics.jsonl"
        start = 0
        if resume_step is not None:
            extra = checkpoint.load(ckpt_root, resume_step, model, optimizer)
            expected = resume_step * t.global_batch_size
            if extra["consumed_samples"] != expected:
                raise UserError(f"{ckpt_root}: checkpoint {resume_step} consumed "
                                f"{extra['consumed_samples']} samples, this config {expected}; "
                                "delete the pretrain output folder to start over")
            phase = _phase_at(train_data, expected - 1)
            if extra.get("phase") is not None and extra["phase"] != phase:
                raise UserError(f"{ckpt_root}: checkpoint {resume_step} was in blend phase "
                                f"{extra['phase']!r}, this config puts it in {phase!r}; delete "
                                "the pretrain output folder to start over")
            start = resume_step
            if writer:
                for row in loop.truncate_metrics(metrics_path, resume_step):
                    ctx.log.metrics(_values(row), step=row["step"])
            log.info("resuming from step %d of %d", start, c.steps)
        elif writer and metrics_path.exists():
            metrics_path.unlink()       # a killed attempt that never reached a checkpoint
        parallel.barrier()

        def on_metrics(step: int, m: dict[str, float]) -> None:
            ctx.log.metrics(m, step=step)
            if step % t.log_interval == 0 or step == c.steps:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tokens/s", step,
                         c.steps, m["loss"], m["lr"], m["grad_norm"], m["tokens_per_s"])
            if "val_loss" in m:
                general = f", general {m['val_general_loss']:.4f}" \
                    if "val_general_loss" in m else ""
                log.info("step %d/%d held-out loss %.4f (ppl %.2f, %d sequences)%s", step,
                         c.steps, m["val_loss"], m["val_ppl"], cfg.eval_samples, general)

        def on_checkpoint(step: int) -> None:
            checkpoint.save(ckpt_root, step, model, optimizer, step * t.global_batch_size,
                            keep_steps=cfg.checkpoint_steps_to_keep(step),
                            phase=_phase_at(train_data, step * t.global_batch_size - 1))

        tracked = ctx.track(c.steps, f"pretrain {c.family}") if writer else \
            contextlib.nullcontext(None)
        with tracked as track:
            if track is not None:
                track.advance(start)
            loop.train(model, optimizer, train_data, cfg, start_step=start,
                       metrics_path=metrics_path, on_metrics=on_metrics,
                       on_checkpoint=on_checkpoint, track=track, eval_data=eval_data)

        parallel.barrier()
        if not writer:
            return {}
        # The index caches and an extended base are rebuilt in seconds; not worth keeping.
        shutil.rmtree(ctx.out / "data_cache", ignore_errors=True)
        shutil.rmtree(ctx.out / EXTENDED_BASE, ignore_errors=True)
        ctx.log.artifact(ctx.out / "model.json")
        ctx.log.artifact(metrics_path)
        return _headline(loop.read_metrics(metrics_path), t.log_interval)

    def _blend_plan(self, ctx: StageContext, pack_dir: Path, writer: bool) -> dict | None:
        """Shares, planned tokens and epochs per source for this run's budget (blend.json)."""
        from factory.corpus.blend import log_plan

        if self.config.blend is None:
            return None
        t = self.config.training
        meta = json.loads((pack_dir / "pack.json").read_text())
        plan = self.config.blend.plan({n: s["tokens"] for n, s in meta["sources"].items()},
                                      self.config.steps * t.global_batch_size * t.seq_length)
        if writer:
            (ctx.out / "blend.json").write_text(json.dumps(plan, indent=2) + "\n")
            ctx.log.artifact(ctx.out / "blend.json")
            log_plan(plan, ctx.log)
        return plan

    def _base_folder(self, ctx: StageContext, writer: bool) -> Path | None:
        """The HF folder a continued run starts from: the base itself, or, when the vocab stage
        extended the base vocabulary (vocab/extension.json), the base with its embeddings
        resized and initialised for the new tokens (written once, under ctx.out)."""
        c = self.config
        if c.strategy != "continued":
            return None
        base = Path(c.base)
        if not (ctx.inputs["vocab"] / "extension.json").is_file():
            return base
        try:
            from tokenization.embeddings import extend_hf_model
        except ImportError:
            raise UserError(f"{ctx.inputs['vocab'] / 'extension.json'}: continued pretraining "
                            "with an extended vocabulary: not supported yet (needs "
                            "tokenization.embeddings.extend_hf_model)") from None
        from factory.train import parallel
        from factory.train.models import VOCAB_MULTIPLE

        out = ctx.out / EXTENDED_BASE
        if writer and not (out / "config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            extend_hf_model(base, ctx.inputs["vocab"] / "tokenizer", tmp,
                            pad_multiple=VOCAB_MULTIPLE)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        parallel.barrier()
        return out

    # --- helpers -------------------------------------------------------------------------

    def _check_pack(self, pack_dir: Path, vocab_size: int) -> None:
        path = pack_dir / "pack.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable ({e.__class__.__name__}); rerun the pack "
                            "stage") from None
        if meta.get("family") != self.config.family:
            raise UserError(f"{path}: packed for family {meta.get('family')!r}, the manifest "
                            f"says {self.config.family!r}; rerun the pack stage")
        if meta.get("vocab_size") != vocab_size:
            raise UserError(f"{path}: vocab_size {meta.get('vocab_size')} differs from the "
                            f"tokenizer's {vocab_size}; rerun the pack stage")

    def _model_config(self, vocab_size: int, base: Path | None = None) -> "ModelConfig":
        from factory.train.models import ModelConfig, config_from_hf, pad_vocab

        c = self.config
        if c.strategy == "continued":
            base = base or Path(c.base)
            cfg = config_from_hf(base, hidden_dropout=c.hidden_dropout,
                                 attention_dropout=c.attention_dropout)
            if vocab_size > cfg.vocab_size:
                raise UserError(f"vocab: the tokenizer has {vocab_size} tokens, the base "
                                f"{base} only {cfg.vocab_size} embeddings; use the base's "
                                "tokenizer or extend the vocabulary")
            # An extended base stores its padded rows (config.vocab_size = padded size): the
            # rows past the tokenizer name no token and get the padding bias.
            return dataclasses.replace(cfg, vocab_size=vocab_size,
                                       padded_vocab_size=max(cfg.padded_vocab_size, cfg.vocab_size))
        dims = dict(c.model_dims or {})
        seq = c.training.seq_length
        return ModelConfig(
            family=c.family, num_layers=dims["num_layers"], hidden_size=dims["hidden_size"],
            num_attention_heads=dims["num_attention_heads"],
            ffn_hidden_size=dims["ffn_hidden_size"],
            num_query_groups=dims.get("num_query_groups") if c.family == "gpt" else None,
            vocab_size=vocab_size, padded_vocab_size=pad_vocab(vocab_size),
            # BERT keeps 512 learned positions (the HF default) so fine-tuning can go longer.
            max_position_embeddings=max(512, seq) if c.family == "bert" else seq,
            hidden_dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
            **({"layernorm_epsilon": GPT_LAYERNORM_EPSILON} if c.family == "gpt" else {}))

    def _engine(self, data_parallel: int, saved: str | None) -> str:
        import torch

        from factory.train import engine

        return engine.resolve(self.config.parallel.engine, cuda=torch.cuda.is_available(),
                              data_parallel=data_parallel,
                              precision=self._loop_config().precision, saved=saved)

    def _refuse_bf16_without_cuda(self, engine_name: str) -> None:
        import torch

        if self.config.training.precision == "bf16" and engine_name == "torch" and \
                not torch.cuda.is_available():
            raise UserError("training.precision bf16: with parallel.engine torch it needs a "
                            "GPU (on CPU megatron-core's linear layers have no autocast "
                            "backward); use parallel.engine megatron or auto, or precision "
                            "auto/fp32")

    def _loop_config(self, model_cfg: "ModelConfig | None" = None,
                     engine_name: str = "torch"):
        import torch

        from factory.train.loop import LoopConfig, flops_per_token
        from factory.train.schedule import LRSchedule

        c = self.config
        t = c.training
        wsd = {"decay_fraction": t.schedule.decay_fraction} \
            if t.schedule.decay_fraction is not None else {}
        precision = t.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        flops = None
        if model_cfg is not None and torch.cuda.is_available():
            flops = flops_per_token(model_cfg.num_layers, model_cfg.hidden_size,
                                    t.seq_length, model_cfg.matmul_parameters())
        return LoopConfig(
            family=c.family, total_steps=c.steps, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, seq_length=t.seq_length,
            schedule=LRSchedule(lr=t.lr, total_steps=c.steps, warmup_steps=c.warmup_steps,
                                decay=t.schedule.decay, min_lr=t.schedule.min_lr, **wsd),
            betas=tuple(t.optimizer.betas), eps=t.optimizer.eps,
            weight_decay=t.optimizer.weight_decay, clip_grad=t.clip_grad,
            checkpoint_interval=t.checkpoint_interval, precision=precision,
            engine=engine_name, flops_per_token=flops, eval_interval=t.eval_interval,
            # Whole global batches (Megatron-LM's --eval-iters): whole micro-batches on every
            # data-parallel rank, and the same samples under any layout.
            eval_samples=-(-t.eval_samples // t.global_batch_size) * t.global_batch_size)


def _dropout(value: float | None, strategy: str) -> float | None:
    """The manifest's dropout, else SCRATCH_DROPOUT from scratch and None (the base
    checkpoint's own) when continued."""
    if value is not None or strategy == "continued":
        return value
    return SCRATCH_DROPOUT


def _phase_at(train_data, index: int) -> str | None:
    """The blend phase of sample `index` (None when the data has no phases)."""
    phase_of = getattr(train_data, "phase_of", None)
    return phase_of(index) if phase_of is not None and index >= 0 else None


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _values(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step"}


def _headline(rows: list[dict], log_interval: int) -> dict[str, float]:
    if not rows:
        return {}
    last = rows[-log_interval:]
    return {
        "final_loss": sum(r["loss"] for r in last) / len(last),
        "first_loss": rows[0]["loss"],
        "steps": float(rows[-1]["step"]),
        "tokens": float(rows[-1]["tokens"]),
        # Median: robust to the first step's warm-up and checkpoint-time hiccups.
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        **{f"final_{k}": rows[-1][k] for k in ("val_loss", "val_general_loss")
           if k in rows[-1]},
    }
