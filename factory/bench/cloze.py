"""Zero-shot cloze (CodeXGLUE ClozeTest-maxmin): which candidate fills the `<mask>`?

Masked LMs (Feng et al. 2020's protocol): the docstring and the code go in as one sequence with
the mask token at the blank, and the candidate with the higher probability wins. A candidate
the tokenizer splits into k pieces gets k mask tokens and the sum of their log-probabilities.
Causal LMs: the sequence is scored with each candidate written in, by the log-likelihood of
the candidate and everything after it (the prefix is the same for all candidates).
Long inputs keep a window of max_seq_length tokens around the blank, half on each side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from factory.bench.finetune import ProgressFn, pick_device
from factory.stage import UserError

log = logging.getLogger(__name__)

MASK = "<mask>"


@dataclass(frozen=True)
class ClozeExample:
    left: str                     # docstring and code before the blank
    right: str                    # code after it
    answer: str
    candidates: tuple[str, ...] = ("max", "min")


def model_kind(model_dir: Path) -> Literal["mlm", "causal"]:
    """mlm for encoder folders (BERT-like), causal for decoder ones (LlamaForCausalLM...)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    archs = " ".join(cfg.architectures or [])
    return "causal" if "CausalLM" in archs or cfg.is_decoder else "mlm"


def cloze_predict(model_dir: Path, examples: list[ClozeExample], max_seq_length: int = 256,
                  progress: ProgressFn | None = None, device: str | None = None) -> list[str]:
    """The chosen candidate of each example."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    kind = model_kind(model_dir)
    dev = pick_device(device)
    if kind == "mlm" and tok.mask_token_id is None:
        raise UserError(f"{model_dir}: the tokenizer has no mask token: cannot fill a cloze")
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    half = max(1, (max_seq_length - 2) // 2)
    out = []
    with torch.inference_mode():
        for done, ex in enumerate(examples, 1):
            left = tok(ex.left, add_special_tokens=False)["input_ids"][-half:]
            right = tok(" " + ex.right, add_special_tokens=False)["input_ids"][:half]
            scores = [_score(model, tok, kind, left, right,
                             tok(" " + c, add_special_tokens=False)["input_ids"], dev)
                      for c in ex.candidates]
            out.append(ex.candidates[max(range(len(scores)), key=scores.__getitem__)])
            if progress is not None and (done % 50 == 0 or done == len(examples)):
                progress("predict", done, len(examples), {})
    return out


def _score(model, tok, kind, left, right, cand, dev) -> float:
    import torch

    if kind == "mlm":
        ids = ([tok.cls_token_id] if tok.cls_token_id is not None else []) + left
        start = len(ids)
        ids = ids + [tok.mask_token_id] * len(cand) + right
        ids += [tok.sep_token_id] if tok.sep_token_id is not None else []
        logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0]
        logp = torch.log_softmax(logits[start:start + len(cand)].float(), -1)
        return float(sum(logp[i, t] for i, t in enumerate(cand)))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + left + cand + right
    start = len(bos) + len(left)          # first scored position: the candidate's first piece
    logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0].float()
    logp = torch.log_softmax(logits[max(start - 1, 0):len(ids) - 1], -1)
    targets = ids[max(start, 1):]
    return float(logp[torch.arange(len(targets)), torch.tensor(targets)].sum())
