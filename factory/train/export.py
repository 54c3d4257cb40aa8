"""The export stage: the newest pretrain checkpoint -> a plain Hugging Face folder.

Reads pretrain/model.json and pretrain/checkpoints/ (latest.txt names the step), and the
tokenizer of vocab/tokenizer/; writes export/hf/ = a BertForMaskedLM or LlamaForCausalLM folder
(config.json, model.safetensors, tokenizer files) that loads with strict key matching. Before
returning it reloads the folder with transformers and compares logits with megatron's on a
small batch, so a broken export fails here rather than in evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from factory.hf_weights import from_pretrained
from factory.stage import Stage, StageConfig, StageContext, UserError

if TYPE_CHECKING:
    import torch

    from factory.manifest import Loaded
    from factory.train.models import ModelConfig

log = logging.getLogger(__name__)

# Reloading the export doubles the memory; past this size the check is skipped.
VERIFY_MAX_PARAMETERS = 300_000_000
VERIFY_TOLERANCE = 1e-3


class ExportConfig(StageConfig):
    family: Literal["bert", "gpt"] = Field(description="Model family of the pretrain stage")


class ExportStage(Stage):
    name = "export"
    Config = ExportConfig

    @classmethod
    def from_manifest(cls, loaded: Loaded) -> ExportStage:
        return cls(ExportConfig(family=loaded.manifest.family))

    def run(self, ctx: StageContext) -> dict[str, float]:
        import torch

        from factory.train import parallel
        from factory.train.convert import save_hf
        from factory.train.models import ModelConfig, count_parameters

        pretrain, vocab = ctx.inputs["pretrain"], ctx.inputs["vocab"]
        cfg = ModelConfig.load(pretrain / "model.json")
        if cfg.family != self.config.family:
            raise UserError(f"{pretrain / 'model.json'}: family {cfg.family!r}, but the manifest "
                            f"says {self.config.family!r}; rerun the pretrain stage")
        tokenizer = vocab / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            raise UserError(f"{tokenizer}: no tokenizer.json; rerun the vocab stage")
        step, _ = newest_checkpoint(pretrain)

        # Always one process: under torchrun the runner exports on rank 0 alone.
        parallel.init(solo=True)
        model = load_checkpoint_model(pretrain).eval()
        out = ctx.out / "hf"
        save_hf(model, cfg, tokenizer, out)
        n = count_parameters(model)
        metrics = {"parameters": float(n), "step": float(step)}
        if n <= VERIFY_MAX_PARAMETERS:
            with torch.no_grad():
                diff = max_logit_difference(model, cfg, out)
            if diff > VERIFY_TOLERANCE:
                raise RuntimeError(f"export check failed: HF logits differ from megatron's by "
                                   f"{diff:.3g} (> {VERIFY_TOLERANCE})")
            metrics["max_abs_logit_diff"] = diff
        else:
            log.info("export check skipped: %d parameters", n)
        ctx.log.artifact(out / "config.json", "hf")
        log.info("exported step %d (%d parameters) to %s", step, n, out)
        return metrics


def newest_checkpoint(pretrain: Path) -> tuple[int, Path]:
    """(step, its model/ folder) from checkpoints/latest.txt; UserError when there is none."""
    from factory.train.checkpoint import iter_dir, latest_step

    root = pretrain / "checkpoints"
    step = latest_step(root)
    if step is None:
        raise UserError(f"{root / 'latest.txt'}: missing, so no complete checkpoint; rerun the "
                        "pretrain stage")
    folder = iter_dir(root, step) / "model"
    if not folder.is_dir():
        raise UserError(f"{folder}: missing; delete the pretrain output folder to start over")
    return step, folder


def load_checkpoint_model(pretrain: Path) -> torch.nn.Module:
    """The model of a pretrain/ folder (model.json) with its newest checkpoint's weights.

    Needs `factory.train.parallel.init()` first, like build_model.
    """
    from factory.train.models import ModelConfig, build_model

    cfg = ModelConfig.load(Path(pretrain) / "model.json")
    _, folder = newest_checkpoint(Path(pretrain))
    model = build_model(cfg)
    load_checkpoint(model, folder)
    return model


def load_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """Model weights only (no optimizer, no RNG) from a dist_checkpointing folder."""
    from factory.train import safe_dcp

    try:
        state = safe_dcp.load(model.sharded_state_dict(), folder)
        model.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{folder}: cannot load checkpoint ({e.__class__.__name__}: {first}); "
                        "does model.json match it? Rerun the pretrain stage") from None


def max_logit_difference(model: torch.nn.Module, cfg: ModelConfig, hf_dir: Path,
                         batch: int = 2, seq: int = 16) -> float:
    """Largest |HF logit - megatron logit| on a fixed random batch (a padded batch for BERT),
    over every column, the padded vocabulary included."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    device = next(model.parameters()).device
    if cfg.family == "bert":
        from transformers import BertForMaskedLM

        mask = torch.ones_like(ids)
        mask[-1, seq // 2:] = 0
        hf = from_pretrained(BertForMaskedLM, hf_dir).eval()
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids.to(device), mask.to(device)).float().cpu()
        keep = mask.bool()
        return (theirs[keep] - ours[keep]).abs().max().item()
    from transformers import LlamaForCausalLM

    hf = from_pretrained(LlamaForCausalLM, hf_dir).eval()
    theirs = hf(input_ids=ids).logits
    pos = torch.arange(seq).expand(batch, seq)
    ours = model(ids.to(device), pos.to(device), None).float().cpu()
    return (theirs - ours).abs().max().item()
