"""The model chunks of an interleaved pipeline, held as one module.

With `parallel.virtual_pipeline: V` each pipeline rank holds V chunks of the model (chunk i
of rank r is virtual stage i * PP + r), and megatron's interleaved 1F1B schedule takes them
as a list. Everything else in the factory (optimizer, checkpoints, HF import, the engines)
sees one module: `ModelChunks`, whose checkpoint state nests each chunk under `model{i}`
(Megatron-LM's layout). Sharded keys stay global, so a checkpoint written with chunks loads
into a model without them and back.
"""

from __future__ import annotations

from typing import Any

import torch


class ModelChunks(torch.nn.ModuleList):
    def sharded_state_dict(self, *args, **kwargs) -> dict[str, Any]:
        return {f"model{i}": chunk.sharded_state_dict(*args, **kwargs)
                for i, chunk in enumerate(self)}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True):
        for i, chunk in enumerate(self):
            chunk.load_state_dict(state[f"model{i}"], strict=strict)

    @property
    def config(self):
        return self[0].config

    # megatron DDP's per-step calls, when the chunks are DDP-wrapped (engine megatron).
    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()


def chunks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The list megatron's schedules take: the chunks, or the model alone."""
    return list(model) if isinstance(model, ModelChunks) else [model]
