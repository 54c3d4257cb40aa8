"""Training checkpoints that a kill at any moment cannot leave looking complete.

Layout (pretrain/ contract):
    checkpoints/iter_NNNNNNN/model/             dist_checkpointing of the bare model's
                                                sharded_state_dict (bf16 under engine megatron
                                                with bf16, fp32 otherwise)
    checkpoints/iter_NNNNNNN/optimizer/         engine megatron: its optimizer's sharded state
                                                (fp32 main weights, Adam moments)
    checkpoints/iter_NNNNNNN/extra/rank00000.pt engine torch: the optimizer; both: RNG states,
                                                step, consumed samples, engine, model-parallel
                                                layout
    checkpoints/latest.txt                      the newest complete step

A checkpoint is written into `.tmp_iter_NNNNNNN`, renamed when whole, and only then named in
latest.txt (replaced atomically). Readers trust latest.txt alone, so a half-written folder
is never loaded; leftovers are swept on the next start.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.stage import UserError
from factory.train import engine, safe_dcp

log = logging.getLogger(__name__)

LATEST = "latest.txt"
_ITER = re.compile(r"^iter_(\d{7})$")
# megatron's distributed-optimizer layout that saves and loads in parallel and reshards over
# data parallel (Megatron-LM's default; 0.16.1 no longer writes "fully_sharded_model_space").
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    """The step named in latest.txt, or None when there is no complete checkpoint."""
    path = root / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit() or not iter_dir(root, int(text)).is_dir():
        raise UserError(f"{path}: names step {text!r} but no such checkpoint folder exists; "
                        "delete the pretrain output folder to start over")
    return int(text)


def sweep_incomplete(root: Path) -> None:
    """Remove folders of saves that were interrupted (never renamed)."""
    if root.is_dir():
        for p in root.glob(".tmp_iter_*"):
            log.info("removing interrupted checkpoint %s", p.name)
            shutil.rmtree(p, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    """Every RNG the training step draws from, in a form torch.load(weights_only=True) reads."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_states(s: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         consumed_samples: int, keep_steps: set[int] | None = None,
         phase: str | None = None) -> Path:
    """Write checkpoint `step` atomically, point latest.txt at it, prune to `keep_steps`.

    The data position is (phase, consumed_samples): samples are a function of their index, so
    the index alone resumes the data; the phase name is a check that the blend plan agrees.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    megatron = engine.is_megatron(optimizer)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_iter_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "extra").mkdir()
        if megatron:
            (tmp / "optimizer").mkdir()
    _barrier()
    net = engine.bare(model)
    dist_checkpointing.save(net.sharded_state_dict(), str(tmp / "model"))
    if megatron:
        dist_checkpointing.save(optimizer.sharded_state_dict(
            net.sharded_state_dict(), metadata=OPTIMIZER_FORMAT), str(tmp / "optimizer"))
    extra = {"step": step, "consumed_samples": consumed_samples, "phase": phase,
             "engine": "megatron" if megatron else "torch", "layout": _layout(model),
             "optimizer": None if megatron else optimizer.state_dict(), "rng": rng_states()}
    _write(tmp / "extra" / f"rank{rank:05d}.pt", lambda f: torch.save(extra, f))
    _barrier()
    final = iter_dir(root, step)
    if rank == 0:
        if final.exists():      # an earlier attempt got this far but never updated latest.txt
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write(root / LATEST, lambda f: f.write(f"{step}\n".encode()))
        if keep_steps is not None:
            prune(root, keep_steps | {step})
    _barrier()
    log.info("checkpoint %s", final)
    return final


def prune(root: Path, keep_steps: set[int]) -> None:
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and int(m.group(1)) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


def load(root: Path, step: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model, optimizer and RNG states of checkpoint `step`; returns the extra dict."""

    folder = iter_dir(root, step)
    net = engine.bare(model)
    extra = _extra(folder)
    if optimizer is not None:
        saved = extra.get("engine", "torch")
        here = "megatron" if engine.is_megatron(optimizer) else "torch"
        if saved != here:
            raise UserError(f"{folder}: written by parallel.engine {saved}, this run uses "
                            f"{here}; resume with engine {saved} (or auto) or delete the "
                            "pretrain output folder to start over")
        layout = _layout(model)
        if extra.get("layout", layout) != layout:
            raise UserError(
                f"{folder}: written at {_describe(extra['layout'])}, this run is "
                f"{_describe(layout)}; its optimizer state cannot change the model-parallel "
                "layout (data parallel may change): resume with the same parallel.tensor / "
                "pipeline / virtual_pipeline, or delete the pretrain output folder")
    try:
        state = safe_dcp.load(net.sharded_state_dict(), folder / "model")
        net.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise _unreadable(folder, e) from None
    if optimizer is not None:
        if here == "torch":
            optimizer.load_state_dict(extra["optimizer"])
        else:
            # no_grad: with fp32 parameters the distributed optimizer's main weights are
            # views of them, which a plain copy_ may not write into.
            try:
                with torch.no_grad():
                    engine.prepare_to_load(optimizer)
                    engine.load_state(optimizer, safe_dcp.load(
                        optimizer.sharded_state_dict(net.sharded_state_dict(), is_loading=True,
                                                     metadata=OPTIMIZER_FORMAT),
                        folder / "optimizer"))
            except (OSError, RuntimeError, KeyError, ValueError) as e:
                raise _unreadable(folder, e) from None
    set_rng_states(extra["rng"])
    return extra


def _layout(model: torch.nn.Module) -> dict[str, int]:
    """The model-parallel layout this rank's optimizer state is cut for."""
    from megatron.core import parallel_state

    from factory.train.chunks import chunks_of

    if not parallel_state.model_parallel_is_initialized():
        return {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1}
    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": len(chunks_of(engine.bare(model)))}


def _describe(layout: dict[str, int]) -> str:
    return (f"tensor {layout['tensor']} / pipeline {layout['pipeline']} / virtual_pipeline "
            f"{layout['virtual_pipeline']}")


def engine_of(root: Path, step: int) -> str:
    """The engine (torch or megatron) that wrote checkpoint `step`."""
    return _extra(iter_dir(root, step)).get("engine", "torch")


def _extra(folder: Path) -> dict[str, Any]:
    """This rank's extra record of a checkpoint folder (step, data position, RNG states)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        return torch.load(folder / "extra" / f"rank{rank:05d}.pt", map_location="cpu",
                          weights_only=True)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise _unreadable(folder, e) from None


def _unreadable(folder: Path, e: Exception) -> UserError:
    return UserError(f"{folder}: cannot load checkpoint ({e.__class__.__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); delete the pretrain "
                     "output folder to start over")


def _write(path: Path, fill) -> None:
    """Write via a temporary name + fsync + rename, so readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
