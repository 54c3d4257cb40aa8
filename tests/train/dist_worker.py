"""Jobs for test_distributed.py, run on every rank under
`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.train.dist_worker JOBS`.

JOBS is a JSON file: {"vocab": ..., "pack": ..., "jobs": [{"kind": "train", "out": ...,
"overrides": [...]}, {"kind": "logits", "pretrain": ..., "tensor": 2, "out": ...},
{"kind": "import", "hf": ..., "tensor": 2, "out": ...}, {"kind": "main_weights", "out": ...}]}.
Jobs run in order in one process group; each sets its own parallel layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train(spec: dict, inputs: dict[str, Path]) -> None:
    from factory.stage import MemoryLog, StageContext
    from tests.train.conftest import pretrain_stage

    stage = pretrain_stage(spec.get("family", "bert"), *spec["overrides"])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    stage.run(StageContext(out=out, inputs=inputs, log=MemoryLog()))


def logits(spec: dict) -> None:
    """Load a pretrain/ folder's newest checkpoint at TP=spec["tensor"] (dist_checkpointing
    reshards) and save the gathered MLM logits of a fixed batch from rank 0."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from factory.train import parallel
    from factory.train.export import load_checkpoint_model
    from tests.train.test_distributed import probe_batch

    parallel.init(parallel.Layout(tensor_parallel=spec["tensor"]))
    model = load_checkpoint_model(Path(spec["pretrain"])).eval()
    ids, mask = probe_batch()
    with torch.no_grad():
        out = gather_from_tensor_model_parallel_region(model(ids, mask))
    if dist.get_rank() == 0:
        torch.save(out, spec["out"])


def import_logits(spec: dict) -> None:
    """Import a HF folder straight into a TP=spec["tensor"] model; save the gathered logits of
    the probe batch from rank 0."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from factory.train import parallel
    from factory.train.convert import load_hf_into_megatron
    from factory.train.models import build_model, config_from_hf
    from tests.train.test_distributed import probe_batch

    parallel.init(parallel.Layout(tensor_parallel=spec["tensor"]))
    cfg = config_from_hf(Path(spec["hf"]))
    model = build_model(cfg).eval()
    load_hf_into_megatron(model, Path(spec["hf"]), cfg)
    ids, mask = probe_batch(cfg.vocab_size)
    with torch.no_grad():
        if cfg.family == "bert":
            out = model(ids, mask)
        else:
            out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        out = gather_from_tensor_model_parallel_region(out)
    if dist.get_rank() == 0:
        torch.save(out, spec["out"])


def layers(spec: dict) -> None:
    """Build the model of a manifest's layout; write the global layer numbers each of this
    rank's model chunks holds to spec["out"]-RANK.json."""
    import torch.distributed as dist

    from factory.train import parallel
    from factory.train.chunks import chunks_of
    from factory.train.models import ModelConfig, build_model
    from factory.train.stage import PretrainStage
    from tests.train.conftest import pretrain_stage

    stage: PretrainStage = pretrain_stage(spec.get("family", "bert"), *spec["overrides"])
    parallel.init(stage._layout())
    model = build_model(ModelConfig(family="gpt", **spec["dims"]))
    held = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in chunks_of(model)]
    Path(f"{spec['out']}-{dist.get_rank()}.json").write_text(json.dumps(held))


def main_weights(spec: dict) -> None:
    """The megatron engine in bf16 with the distributed optimizer over both ranks, built for
    a loaded model: save each rank's fp32 main-weight shard values from rank 0."""
    import torch
    import torch.distributed as dist

    from factory.train import engine, parallel
    from tests.train.test_engine import _bert

    parallel.init()
    _, opt = engine.build(_bert(3), engine.EngineConfig(
        name="megatron", precision="bf16", distributed_optimizer=True), loaded_weights=True)
    mine = torch.cat([p.detach().flatten() for g in opt.param_groups for p in g["params"]])
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, mine)
    if dist.get_rank() == 0:
        torch.save(shards, spec["out"])


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    inputs = {"vocab": Path(plan["vocab"]), "pack": Path(plan["pack"])}
    for job in plan["jobs"]:
        if job["kind"] == "train":
            train(job, inputs)
        elif job["kind"] == "import":
            import_logits(job)
        elif job["kind"] == "layers":
            layers(job)
        elif job["kind"] == "main_weights":
            main_weights(job)
        else:
            logits(job)
