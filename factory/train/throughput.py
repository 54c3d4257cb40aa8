"""Step-time measurement shared by benchmarks/cpu_step_time.py and benchmarks/gpu_check.sh:
the factory's megatron-core models against Hugging Face twins of the same dimensions.

Every runner is a zero-argument function doing one full training step (forward, backward,
clip, AdamW) on fixed synthetic data; `time_interleaved` runs them in turns, step by step, so
load from other processes hits them alike, and reports medians. `host_reads` counts how
often a step reads a device value back (benchmarks/host_syncs.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from typing import Callable

import torch

from factory.train.loop import autocast
from factory.train.models import ModelConfig

Runner = Callable[[], None]


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def stepper(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
            precision: str = "fp32") -> Runner:
    """One training step of `model` under `precision` with the loop's AdamW and clipping."""
    from factory.train.engine import build_optimizer

    opt = build_optimizer(model, 1e-4, (0.9, 0.999), 1e-8, 0.01)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device()):
            loss = loss_fn(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def engine_stepper(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
                   precision: str = "fp32") -> Runner:
    """One training step under the megatron engine (factory/train/engine.py): bf16 parameters
    when precision is bf16, DDP grad buffers, megatron's optimizer with the same AdamW
    settings and clipping as `stepper`."""
    from factory.train import engine

    net, opt = engine.build(model, engine.EngineConfig(
        name="megatron", precision=precision, lr=1e-4, eps=1e-8, weight_decay=0.01))

    def step():
        net.zero_grad_buffer()
        opt.zero_grad()
        loss_fn(net).backward()
        net.finish_grad_sync()
        opt.step()

    return step


def on_megatron_tp_ops(step: Runner) -> Runner:
    """`step` on megatron's own linear, region and loss autograd functions: the A side of
    factory/train/plain_tp.py."""
    from factory.train import plain_tp

    def run():
        with plain_tp.megatron_path():
            step()

    return run


Alter = Callable[[torch.nn.Module], None]


def bert_runners(cfg: ModelConfig, batch: int, seq: int, precision: str = "fp32",
                 backends: tuple[str, ...] = ("local",), full_head: bool = False,
                 seed: int = 0, extra: dict[str, Alter] | None = None,
                 megatron_engine: str | None = None, compiled: bool = False
                 ) -> dict[str, Runner]:
    """`hf` (BertForMaskedLM, its default SDPA attention, head over every position) and one
    `megatron[-BACKEND]` runner per core-attention backend (head over masked positions only,
    the training path); with full_head also `megatron-fullhead` (head everywhere, like HF);
    per `extra` entry NAME: fn, `megatron-NAME`, a model that fn altered (A/B checks); with
    megatron_engine (its precision) `megatron-engine`, the training path under the megatron
    engine; with compiled `hf-compiled` and `megatron-compiled`, each with torch.compile on
    every transformer layer (training.compile; HF's BertLayer likewise)."""
    from transformers import BertConfig, BertForMaskedLM

    from factory.train.bert import masked_positions
    from factory.train.models import build_model

    dev = device()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    attn = torch.ones_like(ids)
    loss_mask = (torch.rand(ids.shape, generator=g) < 0.15).float()
    positions = masked_positions(loss_mask).to(dev)     # on the host, as TrainData.batch
    loss_mask = loss_mask.to(dev)
    types = torch.zeros_like(ids)
    hf_labels = torch.where(loss_mask.bool(), ids, torch.full_like(ids, -100))

    hf = BertForMaskedLM(BertConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        max_position_embeddings=cfg.max_position_embeddings)).to(dev).train()
    def hf_loss(m):
        return m(input_ids=ids, attention_mask=attn, token_type_ids=types,
                 labels=hf_labels).loss

    runners = {"hf": stepper(hf, hf_loss, precision)}
    if compiled:
        from factory.train.compiled import compile_layers

        hf_twin = copy.deepcopy(hf)
        for layer in hf_twin.bert.encoder.layer:
            layer.compile()
        runners["hf-compiled"] = stepper(hf_twin, hf_loss, precision)
        extra = {**(extra or {}), "compiled": compile_layers}

    def masked(m):
        per_token = m(ids, attn, tokentype_ids=types, lm_labels=ids, loss_mask=loss_mask,
                      masked_positions=positions)
        return (per_token * loss_mask).sum() / loss_mask.sum()

    def full(m):
        per_token = m(ids, attn, tokentype_ids=types, lm_labels=ids)
        return (per_token * loss_mask).sum() / loss_mask.sum()

    variants = [(f"megatron{'' if b == backends[0] else '-' + b}", b, masked) for b in backends]
    if full_head:
        variants.append(("megatron-fullhead", backends[0], full))
    for name, backend, fn in variants:
        with _attention(backend):
            runners[name] = stepper(build_model(cfg).to(dev).train(), fn, precision)
    for name, alter in (extra or {}).items():
        with _attention(backends[0]):
            model = build_model(cfg).to(dev).train()
        alter(model)
        runners[f"megatron-{name}"] = stepper(model, masked, precision)
    if megatron_engine:
        with _attention(backends[0]):
            model = build_model(cfg).to(dev).train()
        runners["megatron-engine"] = engine_stepper(model, masked, megatron_engine)
    return runners


def gpt_runner(cfg: ModelConfig, batch: int, seq: int, precision: str = "bf16",
               seed: int = 0) -> Runner:
    """One step of the factory's Llama-style GPTModel on random tokens."""
    from factory.train.models import build_model

    dev = device()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(seq, device=dev).expand(batch, seq)
    model = build_model(cfg).to(dev).train()
    return stepper(model, lambda m: m(tokens, pos, None, labels=labels).float().mean(),
                   precision)


def time_interleaved(runners: dict[str, Runner], steps: int, warmup: int = 3
                     ) -> dict[str, float]:
    """Median seconds per step of each runner, the runners taking turns."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, step in runners.items():
            _sync()
            t0 = time.perf_counter()
            step()
            _sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _attention(backend: str):
    old = os.environ.get("FACTORY_ATTENTION")
    os.environ["FACTORY_ATTENTION"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FACTORY_ATTENTION")
        else:
            os.environ["FACTORY_ATTENTION"] = old


def host_reads(fn: Callable[[], object]) -> int:
    """Device values `fn` reads back, each a sync on a GPU: `_local_scalar_dense` calls (what
    `.item()` and `float(t)` run), ops whose output size is data (`nonzero`, `masked_select`,
    indexing with a boolean mask), and the tensors inside a list given to `torch.tensor`
    (read back inside the constructor, where a dispatch mode does not see them). Not counted,
    host tensors on a GPU too: megatron's RNG tracker comparing CPU generator states after
    each fork, and the data loader's batches before they are copied to the device
    (factory/train/data.py)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    sized_by_data = {aten.nonzero.default, aten.masked_select.default}
    indexing = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
    count = 0

    def host_only() -> bool:
        return any(f.filename.endswith(("tensor_parallel/random.py", "factory/train/data.py"))
                   for f in traceback.extract_stack(limit=6))

    def boolean_index(args) -> bool:
        return len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in args[1])

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            if (func is aten._local_scalar_dense.default or func in sized_by_data or
                    (func in indexing and boolean_index(args))) and not host_only():
                count += 1
            return func(*args, **(kwargs or {}))

    def tensors_in(data) -> int:
        if isinstance(data, torch.Tensor):
            return 1
        if isinstance(data, (list, tuple)):
            return sum(tensors_in(x) for x in data)
        return 0

    new_tensor = torch.tensor

    def tensor(data, *args, **kwargs):
        nonlocal count
        if isinstance(data, (list, tuple)):
            count += tensors_in(data)
        return new_tensor(data, *args, **kwargs)

    torch.tensor = tensor
    try:
        with Count():
            fn()
    finally:
        torch.tensor = new_tensor
    return count
