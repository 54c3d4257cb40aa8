"""Training samples from a pack/ folder through megatron-core's datasets.

GPT: `GPTDataset`; BERT: `BERTMaskedWordPieceDataset` (80/10/10 masking, whole words via the
tokenizer's `##` continuations, no next-sentence head); sources blended with
`BlendedMegatronDatasetBuilder`. The weights come from the blend plan the pretrain stage computes
(factory.corpus.blend: phases, each a stretch of the run with its own weights; `epochs` turned
into shares) or, without one, from the pack.json weights.

Phases: phase p covers samples [round(start_p * n), round(start_{p+1} * n)) of the n planned
samples; its own blended dataset is built with seed `phase_seed(seed, p)`, and global sample i
of the run is sample i - first_p of its phase's dataset. So the order is a function of
(seed, phase, position) and switches at the boundary within one run.

Megatron derives every sample from (seed, index) alone (shuffles are seeded, BERT masking
reseeds per index), so the data position of a run is just the number of samples it has
consumed: step s reads samples [(s-1) * global_batch, s * global_batch). Nothing to save,
nothing to fast-forward.

Both datasets need an initialised process group (factory.train.parallel.init) and write their
index caches under `cache_dir`.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from factory.stage import UserError

log = logging.getLogger(__name__)

# Megatron-LM's pretrain_bert.py default: 10% of samples are shorter than seq_length, so the
# model also sees short inputs (Devlin et al. 2019, A.2).
SHORT_SEQUENCE_PROBABILITY = 0.1


@dataclass(frozen=True)
class Blend:
    prefixes: list[str]      # absolute IndexedDataset prefixes
    weights: list[float]     # normalised
    names: list[str]


@dataclass(frozen=True)
class BlendPhase:
    name: str
    start: float             # fraction of the run's samples
    weights: list[float]     # per Blend.names, normalised (0 = not drawn in this phase)


def phase_seed(seed: int, phase: int) -> int:
    """The seed of phase `phase`'s sample order (phase 0 keeps the run's seed)."""
    return seed if phase == 0 else (seed * 1_000_003 + phase * 7_919) % (2 ** 31 - 1)


def read_phases(plan: dict | None, blend: Blend) -> list[BlendPhase]:
    """The phases of a blend plan (factory.corpus.blend); one phase with the pack.json
    weights without one."""
    if plan is None:
        return [BlendPhase("main", 0.0, list(blend.weights))]
    try:
        out = []
        for p in plan["phases"]:
            w = [float(p["weights"].get(n, 0.0)) for n in blend.names]
            total = sum(w)
            out.append(BlendPhase(p["name"], float(p["start"]), [x / total for x in w]))
    except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
        raise UserError(f"blend plan: not readable ({e.__class__.__name__}: {e}); check "
                        "corpus.sources and corpus.phases") from None
    return out


def read_blend(pack_dir: Path) -> Blend:
    """The training sources of a pack/ folder and their weights (pack.json)."""
    meta_path = pack_dir / "pack.json"
    try:
        meta = json.loads(meta_path.read_text())
        sources = meta["sources"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{meta_path}: not a readable pack.json ({e.__class__.__name__}: {e}); "
                        "rerun the pack stage") from None
    names, prefixes, weights = [], [], []
    for name, s in sources.items():
        prefix = pack_dir / s["prefix"]
        for ext in (".bin", ".idx"):
            if not prefix.with_name(prefix.name + ext).is_file():
                raise UserError(f"{meta_path}: source {name!r} has no {prefix.name}{ext}; "
                                "rerun the pack stage")
        if s.get("tokens", 1) <= 0:
            raise UserError(f"{meta_path}: source {name!r} holds no tokens; check the corpus")
        names.append(name)
        prefixes.append(str(prefix))
        weights.append(float(s["weight"]))
    if not names:
        raise UserError(f"{meta_path}: no training sources; rerun the pack stage")
    total = sum(weights)
    return Blend(prefixes, [w / total for w in weights], names)


def load_tokenizer(tokenizer_dir: Path):
    """The megatron tokenizer adapter over a vocab/tokenizer folder."""
    from tokenization.megatron import MegatronTokenizer

    return MegatronTokenizer(tokenizer_dir)


def build_train_dataset(family: Literal["bert", "gpt"], pack_dir: Path, tokenizer,
                        seq_length: int, num_samples: int, seed: int, cache_dir: Path,
                        mask_prob: float = 0.15, whole_word_masking: bool = True,
                        plan: dict | None = None) -> TrainData:
    """The run's training samples (at least `num_samples`), phase by phase of `plan`."""
    blend = read_blend(pack_dir)
    phases = read_phases(plan, blend)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bounds = [round(p.start * num_samples) for p in phases] + [num_samples]
    parts = []
    for i, ph in enumerate(phases):
        size = bounds[i + 1] - bounds[i]
        if size <= 0:
            continue
        used = [j for j, w in enumerate(ph.weights) if w > 0]
        ds = _build_blend(family, [blend.prefixes[j] for j in used],
                          [ph.weights[j] for j in used], tokenizer, seq_length, size,
                          phase_seed(seed, i), cache_dir, mask_prob, whole_word_masking, pack_dir)
        parts.append(_Part(ph.name, bounds[i], ds, [blend.names[j] for j in used]))
        log.info("training data, phase %s: samples [%d, %d) from %s", ph.name, bounds[i],
                 bounds[i + 1], ", ".join(f"{blend.names[j]} ({ph.weights[j]:.2f})" for j in used))
    return TrainData(family, PhasedDataset(parts), seq_length)


def heldout_splits(pack_dir: Path) -> list[str]:
    """The held-out splits a pack/ holds: `heldout` (the domain's), and `general_heldout`
    (corpus.general_text) from packs that have it."""
    try:
        meta = json.loads((pack_dir / "pack.json").read_text())
    except (OSError, ValueError):
        return []
    return [s for s in ("heldout", "general_heldout") if isinstance(meta.get(s), dict)]


def build_heldout_dataset(family: Literal["bert", "gpt"], pack_dir: Path, tokenizer,
                          seq_length: int, num_samples: int, seed: int, cache_dir: Path,
                          mask_prob: float = 0.15, whole_word_masking: bool = True,
                          split: str = "heldout") -> TrainData:
    """`num_samples` fixed sequences of the pack's held-out `split` (masked as in training
    for bert, the masks a function of the seed and the index): what training.eval_interval
    evaluates. Fewer held-out sequences than that are cycled in megatron's epochs."""
    meta_path = pack_dir / "pack.json"
    try:
        prefix = pack_dir / json.loads(meta_path.read_text())[split]["prefix"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: no {split} split ({e.__class__.__name__}: {e}); rerun "
                        "the pack stage, or set training.eval_interval: null") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = _build_blend(family, [str(prefix)], [1.0], tokenizer, seq_length, num_samples, seed,
                      cache_dir, mask_prob, whole_word_masking, pack_dir)
    return TrainData(family, ds, seq_length)


def _build_blend(family, prefixes, weights, tokenizer, seq_length, num_samples, seed,
                 cache_dir, mask_prob, whole_word_masking, pack_dir):
    """One megatron dataset (blended over `prefixes` when more than one)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    total = sum(weights)
    # One source: no blending layer (megatron builds the mid-level dataset directly).
    weights = [w / total for w in weights] if len(prefixes) > 1 else None
    common = {"random_seed": seed, "sequence_length": seq_length,
              "blend": (prefixes, weights), "split": "1,0,0",
              "path_to_cache": str(cache_dir), "tokenizer": tokenizer}
    if family == "gpt":
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        cls = GPTDataset
        config = GPTDatasetConfig(**common, reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False,
                                  create_attention_mask=False)
    elif family == "bert":
        from megatron.core.datasets.bert_dataset import (
            BERTMaskedWordPieceDataset,
            BERTMaskedWordPieceDatasetConfig,
        )

        cls = BERTMaskedWordPieceDataset
        # Whole-word unigram masking as BERT and PubMedBERT do (megatron's pretrain_bert.py
        # masks up to 3-grams; here masking_max_ngram=1).
        config = BERTMaskedWordPieceDatasetConfig(
            **common, masking_probability=mask_prob,
            short_sequence_probability=SHORT_SEQUENCE_PROBABILITY, masking_max_ngram=1,
            masking_do_full_word=whole_word_masking, masking_do_permutation=False,
            masking_use_longer_ngrams=False, masking_use_geometric_distribution=False,
            classification_head=False)
    else:
        raise ValueError(f"unknown family {family!r}")
    with warnings.catch_warnings():
        if family == "gpt":
            # GPT tokenizers often pad with their end-of-document token; megatron then stops
            # treating that id as padding and warns. Packed GPT samples hold no padding.
            warnings.filterwarnings("ignore", message="The pad token id in the tokenizer")
        train, _, _ = BlendedMegatronDatasetBuilder(
            cls, [num_samples, 0, 0], lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise UserError(f"{pack_dir}: the pack yields {0 if train is None else len(train)} "
                        f"training samples, {num_samples} needed")
    return train


@dataclass(frozen=True)
class _Part:
    name: str
    first: int               # the run's index of this phase's sample 0
    dataset: Any
    names: list[str]         # sources of the dataset, in its blend order


class PhasedDataset:
    """The run's samples: phase datasets laid end to end."""

    def __init__(self, parts: list[_Part]):
        self.parts = parts
        self._firsts = [p.first for p in parts]

    def __len__(self) -> int:
        return self.parts[-1].first + len(self.parts[-1].dataset)

    def _locate(self, index: int) -> tuple[_Part, int]:
        k = int(np.searchsorted(self._firsts, index, side="right")) - 1
        if k + 1 < len(self.parts) or index - self.parts[k].first < len(self.parts[k].dataset):
            return self.parts[k], index - self.parts[k].first
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, j = self._locate(index)
        return part.dataset[j]

    def phase_of(self, index: int) -> str:
        return self._locate(index)[0].name

    def source_of(self, index: int) -> str:
        """The source sample `index` is drawn from."""
        part, j = self._locate(index)
        if len(part.names) == 1:
            return part.names[0]
        return part.names[int(part.dataset.dataset_index[j])]


class TrainData:
    """Index-addressed batches: `batch(start, count)` is samples [start, start + count)."""

    def __init__(self, family: str, dataset: Any, seq_length: int):
        self.family = family
        self.dataset = dataset
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def phase_of(self, index: int) -> str:
        """The blend phase of global sample `index` (for logging)."""
        return self.dataset.phase_of(index)

    def source_of(self, index: int) -> str:
        return self.dataset.source_of(index)

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """Model inputs as int64/float tensors:
        bert: tokens, labels, loss_mask, attention_mask [b,s] (1 = real token), types,
              masked_positions (bert.masked_positions, found here on the host);
        gpt:  tokens, labels, loss_mask, position_ids."""
        items = [self.dataset[i] for i in range(start, start + count)]
        if self.family == "bert":
            out = {
                "tokens": _stack(items, "text"),
                # megatron marks unmasked labels -1; its loss wants valid ids + a loss mask.
                "labels": _stack(items, "labels").clamp_min(0),
                "loss_mask": _stack(items, "loss_mask").float(),
                "attention_mask": _stack(items, "padding_mask"),
                "types": _stack(items, "types"),
            }
            from factory.train.bert import masked_positions     # megatron's model classes

            out["masked_positions"] = masked_positions(out["loss_mask"])
        else:
            out = {
                "tokens": _stack(items, "tokens"),
                "labels": _stack(items, "labels"),
                "loss_mask": _stack(items, "loss_mask").float(),
                "position_ids": _stack(items, "position_ids"),
            }
        return out


def _stack(items: list[dict], key: str) -> torch.Tensor:
    vals = [it[key] for it in items]
    if isinstance(vals[0], torch.Tensor):
        return torch.stack(vals).long()
    return torch.from_numpy(np.stack(vals)).long()
