"""A checkpoint's `.metadata` checked before torch unpickles it.

megatron's dist_checkpointing stores each folder's index as torch.distributed.checkpoint's
`.metadata`, which torch 2.13 reads with a plain `pickle.load`: a folder from someone else
could run code on load. Before any load the factory unpickles that file itself with an
unpickler that can build only what such an index holds (torch.distributed.checkpoint's
metadata and planner records, torch.Size, dtypes, layouts) and refuses anything else, so a
hostile file fails as a one-line error instead of running. (The other files megatron reads,
`common.pt` and sharded objects, go through torch.load's weights_only default.)
"""

from __future__ import annotations

import pickle
from pathlib import Path

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
    """Raise UserError unless `folder/.metadata` is a plain checkpoint index."""
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
