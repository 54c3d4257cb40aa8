"""Reading a dist_checkpointing folder without running code from it.

A Megatron checkpoint folder holds three kinds of pickles that megatron-core 0.16.1 and torch
2.13 unpickle on load: the index (`.metadata`, a plain `pickle.load`), the common state
(`common.pt`, a `torch.load` that is weights_only only by torch's default, which
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off) and every non-tensor object inside the `.distcp`
files (megatron's ShardedObjects: each linear's `_extra_state`, the optimizer's parameter
groups), which torch's DefaultLoadPlanner reads with `torch.load(..., weights_only=False)`.
A folder from someone else (a resumed run, a checkpoint handed to `factory convert
megatron-to-hf`) could therefore run code on load. `load` closes all three: only the
torch_dist layout the factory writes is read (metadata.json picks megatron's readers); the
index is unpickled first by an unpickler that can build only what an index holds
(torch.distributed.checkpoint's metadata and planner records, torch.Size, dtypes, layouts);
common.pt and each object are read as `torch.load(weights_only=True)` reads them before
megatron's or torch's own reader sees them. Anything else is one UserError, and nothing runs.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from factory.stage import UserError

_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
            "torch.distributed.checkpoint.filesystem"}
_OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
           ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _MODULES and not name.startswith("__") or (module, name) in _OTHERS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check(folder: Path) -> None:
    """Raise UserError unless the folder is a torch_dist checkpoint whose index is a plain
    index and whose common state (`common.pt`) is tensors and plain data."""
    _check_format(Path(folder))
    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise UserError(f"{folder}: no .metadata (not a dist_checkpointing folder); delete the "
                        "pretrain output folder or point at a complete checkpoint")
    try:
        with open(path, "rb") as f:
            _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refers to {e}, which a checkpoint index never holds; not "
                        "loaded (the file would run code when unpickled)") from None
    except Exception as e:      # truncated or not a pickle at all
        raise UserError(f"{path}: unreadable checkpoint index ({e.__class__.__name__}); the "
                        "checkpoint is damaged") from None


def _check_format(folder: Path) -> None:
    """megatron picks its readers from metadata.json, and reads common.pt with a bare
    torch.load (weights_only only by torch's default, which an environment variable turns
    off): only the torch_dist + torch layout the factory writes is read, common.pt as
    weights_only first."""
    try:
        fmt = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        fmt = None
    if not isinstance(fmt, dict) or (fmt.get("sharded_backend"), fmt.get("common_backend")) \
            != ("torch_dist", "torch"):
        raise UserError(f"{folder / 'metadata.json'}: missing or not the torch_dist checkpoint "
                        "layout the factory reads (sharded_backend torch_dist, common_backend "
                        "torch); point at a checkpoint the factory or Megatron-LM wrote")
    common = folder / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{common}: holds {_global(e)}, which a checkpoint never needs; "
                            "not loaded (the file would run code when unpickled)") from None
        except Exception as e:      # truncated or not a torch file
            raise UserError(f"{common}: unreadable ({e.__class__.__name__}); the checkpoint "
                            "is damaged") from None


def _global(e: Exception) -> str:
    """What a weights_only load refused, from torch's message."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else "more than tensors and plain data"


def load(sharded_state_dict: dict, folder: Path) -> dict:
    """megatron's dist_checkpointing.load of `folder`, with both of its pickles read safely."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    check(folder)
    with _objects_weights_only() as refused:
        try:
            return dist_checkpointing.load(sharded_state_dict, str(folder))
        except (Exception, CheckpointException) as e:   # the latter is a BaseException
            if refused:
                fqn, what = refused[0]
                raise UserError(f"{folder}: checkpoint object {fqn} holds {what}, which a "
                                "checkpoint never needs; not loaded (the file would run code "
                                "when unpickled)") from None
            if isinstance(e, CheckpointException):
                # As a RuntimeError the callers' one-line "cannot load" catches it.
                failure = next(iter(e.failures.values()), e)
                failure = failure[0] if isinstance(failure, tuple) else failure
                raise RuntimeError(f"{failure.__class__.__name__}: {failure}") from None
            raise


@contextlib.contextmanager
def _objects_weights_only() -> Iterator[list[tuple[str, str]]]:
    """While it is open, every object torch's load planner unpickles is first read as
    weights_only; the (name, reason) of a refused one is appended to the yielded list."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    unrestricted = DefaultLoadPlanner.load_bytes
    refused: list[tuple[str, str]] = []

    def load_bytes(self: Any, read_item: Any, value: Any) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            refused.append((read_item.dest_index.fqn, _global(e)))
            raise
        # The bytes build only what weights_only allows, so torch's own reader (which also
        # puts the object in place) builds the same objects.
        value.seek(0)
        unrestricted(self, read_item, value)

    DefaultLoadPlanner.load_bytes = load_bytes
    try:
        yield refused
    finally:
        DefaultLoadPlanner.load_bytes = unrestricted
