"""The pretrain stage: megatron-core training from scratch or from a Hugging Face base.

Reads vocab/tokenizer and pack/; writes model.json, checkpoints/ and metrics.jsonl (pretrain/
contract). The runner hands a killed attempt's folder back to the rerun of the same config, so
`run` resumes from the newest complete checkpoint there: model, optimizer and every RNG restored,
the data position recomputed from the step (samples are a function of their index), metrics.jsonl
cut back to the checkpoint and replayed to the tracker. The rerun's losses equal an uninterrupted
run's.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from factory.manifest import Training
from factory.hashing import file_digest
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded
    from factory.train.models import ModelConfig

log = logging.getLogger(__name__)

GPT_LAYERNORM_EPSILON = 1e-5   # Llama's rms_norm_eps


class PretrainConfig(StageConfig):
    family: Literal["bert", "gpt"]
    strategy: Literal["scratch", "continued"]
    model_dims: dict[str, int] | None = Field(
        None, description="num_layers, hidden_size, ... (scratch); None when continued")
    hidden_dropout: float
    attention_dropout: float
    base: str | None = Field(None, description="Resolved base HF folder (continued)")
    training: Training
    steps: int = Field(gt=0, description="training.total_steps")
    warmup_steps: int = Field(ge=0, description="training.warmup_steps")
    mask_prob: float | None = Field(None, description="Masked-LM share (bert)")


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
            hidden_dropout=m.model.hidden_dropout, attention_dropout=m.model.attention_dropout,
            base=base, training=m.training, steps=m.training.total_steps,
            warmup_steps=m.training.warmup_steps,
            mask_prob=m.mask_prob if m.family == "bert" else None))

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
        return []

    def fingerprint(self) -> dict[str, str]:
        if self.config.strategy != "continued" or not self.config.base:
            return {}
        return {"base_weights": file_digest(_weights(Path(self.config.base)))}

    def run(self, ctx: StageContext) -> dict[str, float]:

        from factory.train import checkpoint, data, loop, parallel
        from factory.train.models import build_model

        c = self.config
        t = c.training
        parallel.init(seed=t.seed)
        tokenizer = data.load_tokenizer(ctx.inputs["vocab"] / "tokenizer")
        pack_dir = ctx.inputs["pack"]
        self._check_pack(pack_dir, tokenizer.vocab_size)
        model_cfg = self._model_config(tokenizer.vocab_size)
        (ctx.out / "model.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
        ctx.log.params({f"model.{k}": v for k, v in model_cfg.to_dict().items()})

        ckpt_root = ctx.out / "checkpoints"
        checkpoint.sweep_incomplete(ckpt_root)
        resume_step = checkpoint.latest_step(ckpt_root)

        model = build_model(model_cfg)
        n_params = sum(p.numel() for p in model.parameters())    # tied weights count once
        log.info("%s model: %.2fM parameters", c.family, n_params / 1e6)
        if c.strategy == "continued" and resume_step is None:
            from factory.train.convert import load_hf_into_megatron

            load_hf_into_megatron(model, Path(c.base), model_cfg)
        optimizer = loop.build_optimizer(model, t.lr, t.optimizer.betas, t.optimizer.eps,
                                         t.optimizer.weight_decay)
        train_data = data.build_train_dataset(
            c.family, pack_dir, tokenizer, t.seq_length, c.steps * t.global_batch_size,
            t.seed, ctx.out / "data_cache", mask_prob=c.mask_prob or 0.15,
            whole_word_masking=t.whole_word_masking is not False)
        cfg = self._loop_config()

        metrics_path = ctx.out / "metrics.jsonl"
        start = 0
        if resume_step is not None:
            extra = checkpoint.load(ckpt_root, resume_step, model, optimizer)
            expected = resume_step * t.global_batch_size
            if extra["consumed_samples"] != expected:
                raise UserError(f"{ckpt_root}: checkpoint {resume_step} consumed "
                                f"{extra['consumed_samples']} samples, this config {expected}; "
                                "delete the pretrain output folder to start over")
            start = resume_step
            for row in loop.truncate_metrics(metrics_path, resume_step):
                ctx.log.metrics(_values(row), step=row["step"])
            log.info("resuming from step %d of %d", start, c.steps)
        elif metrics_path.exists():
            metrics_path.unlink()       # a killed attempt that never reached a checkpoint

        def on_metrics(step: int, m: dict[str, float]) -> None:
            ctx.log.metrics(m, step=step)
            if step % t.log_interval == 0 or step == c.steps:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tokens/s", step,
                         c.steps, m["loss"], m["lr"], m["grad_norm"], m["tokens_per_s"])

        def on_checkpoint(step: int) -> None:
            checkpoint.save(ckpt_root, step, model, optimizer, step * t.global_batch_size,
                            keep_steps=cfg.checkpoint_steps_to_keep(step))

        with ctx.track(c.steps, f"pretrain {c.family}") as track:
            track.advance(start)
            loop.train(model, optimizer, train_data, cfg, start_step=start,
                       metrics_path=metrics_path, on_metrics=on_metrics,
                       on_checkpoint=on_checkpoint, track=track)

        # The index caches are rebuilt in seconds from the pack; not worth keeping.
        shutil.rmtree(ctx.out / "data_cache", ignore_errors=True)
        ctx.log.artifact(ctx.out / "model.json")
        ctx.log.artifact(metrics_path)
        return _headline(loop.read_metrics(metrics_path), t.log_interval)

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

    def _model_config(self, vocab_size: int) -> "ModelConfig":
        from factory.train.models import ModelConfig, config_from_hf, pad_vocab

        c = self.config
        if c.strategy == "continued":
            cfg = config_from_hf(Path(c.base), hidden_dropout=c.hidden_dropout,
                                 attention_dropout=c.attention_dropout)
            if vocab_size > cfg.vocab_size:
                raise UserError(f"vocab: the tokenizer has {vocab_size} tokens, the base "
                                f"{c.base} only {cfg.vocab_size} embeddings; use the base's "
                                "tokenizer")
            return cfg
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

    def _loop_config(self):
        from factory.train.loop import LoopConfig
        from factory.train.schedule import LRSchedule

        c = self.config
        t = c.training
        return LoopConfig(
            family=c.family, total_steps=c.steps, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, seq_length=t.seq_length,
            schedule=LRSchedule(lr=t.lr, total_steps=c.steps, warmup_steps=c.warmup_steps,
                                decay=t.schedule.decay, min_lr=t.schedule.min_lr),
            betas=tuple(t.optimizer.betas), eps=t.optimizer.eps,
            weight_decay=t.optimizer.weight_decay, clip_grad=t.clip_grad,
            checkpoint_interval=t.checkpoint_interval)


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
    }
