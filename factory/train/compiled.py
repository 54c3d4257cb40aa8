"""`training.compile`: torch.compile applied to every transformer layer of a built model.

Per layer, as torchtitan does per block, and in place (`Module.compile`), because:
- parameter names do not change (no `_orig_mod.` prefix), so checkpoints, dist_checkpointing,
  the converters and megatron's DDP hooks see the model they always saw;
- the layers are alike, so they share one compiled graph (the first step pays for one layer,
  about 10 s on CPU for a tiny BERT);
- what has data-dependent shapes stays eager: BERT's masked-positions head (a different number
  of positions every micro-batch), the embeddings, megatron's pipeline schedules.
Inside a layer the compiler fuses the elementwise work between the GEMMs (norms, bias,
dropout, residual adds, GELU/SwiGLU, RoPE), which is 43% of the GPU kernel time of the 1B
GPT and much of the launch overhead of BERT-base (BENCHMARKS.md). With SDPA attention at
tensor parallel 1 a layer is one graph; where megatron forks its RNG tracker (local
attention, tensor parallel) it splits into several graphs and still runs.

Dropout inside a compiled layer draws from the default generator through the compiler's own
random kernels: the same seed gives the same masks, so resume stays exact, but not the masks
eager mode draws, so a compiled run's losses are not an eager run's.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from pathlib import Path

import torch

from factory.stage import UserError

log = logging.getLogger(__name__)


def check_available() -> None:
    """UserError when this machine cannot compile: on CPU inductor builds C++ extension
    modules and needs a compiler and Python's headers (GPUs use Triton, which torch's CUDA
    wheels ship)."""
    if torch.cuda.is_available():
        return
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    if not any(shutil.which(n) for n in names):
        raise UserError(f"training.compile: on CPU torch.compile needs a C++ compiler "
                        f"({' or '.join(names)} not found); install one or set "
                        "training.compile: false")
    include = Path(sysconfig.get_path("include"))
    if not (include / "Python.h").is_file():
        raise UserError(f"training.compile: on CPU torch.compile needs Python's headers "
                        f"({include}/Python.h not found); install them (python3-dev) or set "
                        "training.compile: false")


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every megatron TransformerLayer in `model` (any wrapper: DDP, Float16Module,
    model chunks) in place; returns how many."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile()
    log.info("torch.compile: %d transformer layers (compiled on the first step)", len(layers))
    return len(layers)
