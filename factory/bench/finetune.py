"""The fine-tuning loop every benchmark head shares: AdamW, linear warm-up and decay, clipped
gradients, seeded head initialisation and batch order, length-sorted prediction batches.

Settings are the usual BERT fine-tuning ones (Devlin et al. 2019; BLURB's PubMedBERT runs):
10% warm-up, weight decay 0.01 except biases and norms, gradient norm clipped at 1.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from factory.stage import UserError

log = logging.getLogger(__name__)

# (phase, done, total, values): the stage turns it into a progress bar and MLflow metrics.
ProgressFn = Callable[[str, int, int, dict[str, float]], None]
# Rows (indices into the training set) -> the model's keyword arguments, labels included.
BatchFn = Callable[[list[int]], dict[str, Any]]

WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
CLIP_GRAD = 1.0
PREDICT_BATCH_SIZE = 64
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight")


class FinetuneOptions(BaseModel):
    """Fine-tuning settings of one task; each suite has its papers' defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, gt=0)
    max_seq_length: int = Field(128, gt=8)
    seed: int = 42


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def training_steps(n_train: int, options: FinetuneOptions) -> int:
    per_epoch = math.ceil(n_train / options.batch_size)
    return max(1, math.ceil(options.epochs * per_epoch))


def pad(rows: list[list[int]], value: int):
    """(len(rows), longest) long tensor, right-padded with value, and its attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def fit(model, n_train: int, batch: BatchFn, options: FinetuneOptions, *, what: str,
        progress: ProgressFn | None = None) -> float:
    """Train `model` (already on its device) for options.epochs over n_train examples.

    Returns the mean loss over the last epoch's worth of steps. UserError on divergence.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith(NO_DECAY)],
         "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in params if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=options.lr)
    total = training_steps(n_train, options)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total), total)

    gen = torch.Generator().manual_seed(options.seed)
    bs = options.batch_size
    per_epoch = math.ceil(n_train / bs)
    recent: list[float] = []
    step = 0
    model.train()
    while step < total:
        order = torch.randperm(n_train, generator=gen).tolist()
        for b in range(per_epoch):
            if step >= total:
                break
            loss = model(**batch(order[b * bs:(b + 1) * bs])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UserError(f"{what}: fine-tuning diverged at step {step} (loss {value}); "
                                f"lower the learning rate ({options.lr})")
            recent = (recent + [value])[-per_epoch:]
            if progress is not None:
                progress("train", step, total, {"loss": value, "lr": scheduler.get_last_lr()[0]})
    model.eval()
    return sum(recent) / max(1, len(recent))


def predict_logits(model, lengths: list[int], batch: BatchFn,
                   progress: ProgressFn | None = None) -> list:
    """Logits of every example (as CPU tensors, in the original order); batches are sorted by
    length so padding costs little."""
    import torch

    model.eval()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list = [None] * len(lengths)
    batches = [order[i:i + PREDICT_BATCH_SIZE] for i in range(0, len(order), PREDICT_BATCH_SIZE)]
    with torch.inference_mode():
        for done, rows in enumerate(batches, 1):
            kwargs = batch(rows)
            kwargs.pop("labels", None)
            logits = model(**kwargs).logits.float().cpu()
            for r, i in enumerate(rows):
                out[i] = logits[r]
            if progress is not None:
                progress("predict", done, len(batches), {})
    return out


def set_pad_id(model, tokenizer) -> int:
    """The tokenizer's pad id (0 without one), also told to the model: sequence heads of
    decoder models find each row's last token through config.pad_token_id."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return pad_id
