"""Weight-space merging of two Hugging Face checkpoints of one architecture.

The finance recipe's second half: a continued-pretrained model merged back with the model it
started from keeps more of what the base knew (the stability gap, forgetting) at a small cost
on the domain; `benchmarks/merge_tradeoff.py` measures that trade on a run. Every tensor is
combined on its own, so memory holds one shard of each model, not two models:

- linear: (1 - w) * A + w * B.
- slerp: spherical interpolation of each tensor taken as one vector (mergekit's rule: the
  angle from the normalised tensors, the unnormalised ones interpolated; nearly parallel
  tensors fall back to linear).

`w` is B's share: 0 gives A, 1 gives B. The output has A's config, tokenizer and shard layout,
and `merge.json` says what was merged. Tensors pair by name, with or without the base-model
prefix (a BertForMaskedLM export and a bare BertModel base); embedding rows past the shared
tokenizer's last id are padding and stay A's. Everything that can be wrong (pickle weights,
other tensor names or shapes, another vocabulary) is found before anything is written, and
the output appears only once complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from factory.hashing import file_digest
from factory.hf_weights import require_safetensors
from factory.stage import Progress, UserError

log = logging.getLogger(__name__)

Method = Literal["linear", "slerp"]
METHODS: tuple[str, ...] = ("linear", "slerp")
# Config keys that describe a run, not the architecture: they may differ between the models.
RUN_KEYS = {"_name_or_path", "torch_dtype", "dtype", "transformers_version",
            "max_position_embeddings", "use_cache", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout"}
PARALLEL = 0.9995   # |cos| above which slerp is linear (mergekit's DOT_THRESHOLD)


def merge(a: Path, b: Path, out: Path, *, weight: float = 0.5, method: str = "linear",
          keep_a_extras: bool = False,
          progress: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict:
    """Write A and B merged at B's share `weight` into the new folder `out`; a summary.

    keep_a_extras: tensors only A has are copied from A (a trained MLM head whose base, a
    sentence encoder, has none) and B's own extras are left out, where by default any
    difference in tensor names is refused. `progress` makes the rich Progress display,
    started once every check has passed (so an error prints alone)."""
    a, b, out = Path(a), Path(b), Path(out)
    if method not in METHODS:
        raise UserError(f"--method {method!r}: unknown (methods: {', '.join(METHODS)})")
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"--weight {weight}: must lie in [0, 1] (B's share: 0 gives A, 1 "
                        "gives B)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; give a new folder")
    layout_a, layout_b = _layout(a), _layout(b)
    pairs = _check(a, b, layout_a, layout_b, keep_a_extras)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _write(a, b, tmp, layout_a, layout_b, pairs, weight, method, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return summary


def _write(a: Path, b: Path, tmp: Path, layout_a: dict, layout_b: dict,
           pairs: dict[str, str | None], weight: float, method: str, progress) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in a.iterdir():   # config, tokenizer, shard index: A's (never a pickle or its index)
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth") \
                and not f.name.endswith(".bin.index.json"):
            shutil.copy2(f, tmp / f.name)
    parameters = copied = 0
    with contextlib.ExitStack() as stack:
        bar = None
        if progress is not None:
            bar = stack.enter_context(Progress(stack.enter_context(progress())).task(
                len(layout_a), f"merge ({method}, {weight})"))
        b_files = {f: stack.enter_context(safe_open(f, "pt"))
                   for f in sorted({f for f, _, _ in layout_b.values()})}
        for shard in sorted({f for f, _, _ in layout_a.values()}):
            merged = {}
            with safe_open(shard, "pt") as fa:
                for name in fa.keys():
                    ta, other = fa.get_tensor(name), pairs[name]
                    if other is None:     # keep_a_extras
                        merged[name] = ta
                        copied += 1
                    else:
                        tb = b_files[layout_b[other][0]].get_tensor(other)
                        merged[name] = _combine(name, ta, tb, weight, method)
                    parameters += ta.numel() if ta.is_floating_point() else 0
                    if bar is not None:
                        bar.advance(1)
            save_file(merged, tmp / shard.name, metadata={"format": "pt"})
            del merged
    summary = {"method": method, "weight": weight, "tensors": len(layout_a),
               "copied_from_a": copied, "parameters": parameters,
               "models": {"a": _describe(a), "b": _describe(b)}}
    (tmp / "merge.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _combine(name: str, ta, tb, weight: float, method: str):
    import torch

    if ta.shape != tb.shape:   # vocabulary padding (checked): A's rows past the shared ones
        k = min(ta.shape[0], tb.shape[0])
        out = ta.clone()
        out[:k] = _combine(name, ta[:k], tb[:k], weight, method)
        return out
    if not ta.is_floating_point():
        if not torch.equal(ta, tb):
            raise UserError(f"tensor {name}: integer tensors differ between the models; they "
                            "are not the same architecture")
        return ta
    x, y = ta.float(), tb.float()
    if method == "slerp":
        nx, ny = x.norm(), y.norm()
        cos = float((x.flatten() @ y.flatten()) / (nx * ny)) if nx > 0 and ny > 0 else 1.0
        if abs(cos) <= PARALLEL:
            theta = math.acos(max(-1.0, min(1.0, cos)))
            s = math.sin(theta)
            return (math.sin((1 - weight) * theta) / s * x
                    + math.sin(weight * theta) / s * y).to(ta.dtype)
    return ((1 - weight) * x + weight * y).to(ta.dtype)


def _layout(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{tensor name: (its safetensors file, dtype, shape)} from the files' headers only."""
    from safetensors import safe_open

    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    out = {}
    for f in require_safetensors(folder):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                out[name] = (f, sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _check(a: Path, b: Path, la: dict, lb: dict,
           keep_a_extras: bool) -> dict[str, str | None]:
    """A's tensor names paired with B's (`_pairs`); one UserError naming the first
    difference that makes the models unmergeable."""
    ca, cb = (json.loads((f / "config.json").read_text(encoding="utf-8")) for f in (a, b))
    if ca.get("model_type") != cb.get("model_type"):
        raise UserError(f"{b}: model_type {cb.get('model_type')!r}, but {a} is "
                        f"{ca.get('model_type')!r}; merge two models of one architecture")
    pairs = _pairs(la, lb)
    missing = sorted(n for n, m in pairs.items() if m is None)
    extra = sorted(lb.keys() - set(pairs.values()))
    if (missing or extra) and not keep_a_extras:
        name, where = (missing[0], b) if missing else (extra[0], a)
        raise UserError(f"{where}: has no tensor {name} ({len(missing) + len(extra)} names "
                        "differ); merge two models of one architecture, or give "
                        "--keep-a-extras to copy A's own tensors (a head the base lacks)")
    va, vb = _vocab(a), _vocab(b)
    # Rows past the tokenizer's last id are padding (Megatron pads the vocabulary to a
    # multiple of 128, and the export keeps it), so a padded export merges with its base.
    tokens = max(va.values()) + 1 if va is not None and va == vb else None
    for name, other in pairs.items():
        sa, sb = la[name][2], lb[other][2] if other is not None else None
        if other is None or sa == sb:
            continue
        rows = sa[1:] == sb[1:] and len(sa) > 0
        if rows and tokens is not None and min(sa[0], sb[0]) >= tokens:
            continue
        hint = ("the models do not share a vocabulary (an extended vocabulary cannot merge "
                "with its base)" if rows and "emb" in name else "merge two models of one size")
        raise UserError(f"tensor {name}: shape {list(sa)} in {a}, {list(sb)} in {b}; {hint}")
    if va is not None and vb is not None and va != vb:
        diff = sorted((t for t in va.keys() | vb.keys() if va.get(t) != vb.get(t)),
                      key=lambda t: (va.get(t, len(va)), t))
        raise UserError(f"{b}: its tokenizer maps {len(diff)} tokens differently from {a}'s "
                        f"(first: {diff[0]!r}, id {va.get(diff[0])} in A, {vb.get(diff[0])} "
                        "in B); the same ids must mean the same tokens: merge models that "
                        "share a tokenizer")
    differ = sorted(k for k in ca.keys() | cb.keys()
                    if k not in RUN_KEYS and ca.get(k) != cb.get(k))
    if differ:
        log.warning("merge: configs differ in %s; the output keeps A's", ", ".join(differ))
    return pairs


def _pairs(la: dict, lb: dict) -> dict[str, str | None]:
    """Each of A's tensor names -> B's name for it, or None. A task model and its bare base
    name the same weight with and without the base-model prefix (`bert.`, `model.`), as
    transformers' loading does."""
    heads = {k.split(".", 1)[0] for k in lb}
    out: dict[str, str | None] = {}
    for name in la:
        rest = name.split(".", 1)[-1]
        out[name] = next((c for c in (name, rest, *(f"{h}.{name}" for h in sorted(heads)))
                          if c in lb), None)
    return out


def _vocab(folder: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id map, or None when the folder ships no tokenizer."""
    from transformers import AutoTokenizer

    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt",
                                                  "tokenizer.model", "vocab.json")):
        return None
    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def _describe(folder: Path) -> dict:
    return {"path": str(folder.resolve()),
            "weights_sha256": file_digest(require_safetensors(folder))}
