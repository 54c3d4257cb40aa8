"""The GPU check of the pretraining engine (run by benchmarks/gpu_check.sh; see there).

    python benchmarks/gpu_check.py OUT_DIR [--inputs RUN_DIR]

Sections, each saved to OUT_DIR/gpu_check.json as soon as it ends (a later failure or the
time limit loses nothing already measured):
  check           GPU (SDPA attention, fp32, TF32 off) vs the exported Hugging Face twin on
                  CPU, tiny BERT and GPT: logits within 1e-3; bf16 autocast within 1.0 (a
                  smoke bound: bf16's spacing at BERT's -100 padded-vocabulary bias is 0.5).
  gpt_1b          a Llama-3.2-1B-shaped GPT (vocab 32,768), sequence 2048, bf16: the training
                  loop's own step (`loop.train_step`) per engine in GPT_ENGINES (torch:
                  autocast, fused AdamW, global-norm clipping; megatron: bf16 parameters, DDP
                  buffers, megatron's optimizer; ENGINE-compiled: the same with
                  training.compile) and micro batch in GPT_MICROS; tokens/s,
                  MFU, peak memory; then a torch.profiler table of two steps per engine
                  (OUT_DIR/gpt_profile.txt, gpt_profile_megatron.txt): what bounds it.
  bert_base       BERT-base masked LM (vocab 30,522) at BERT_SHAPES (batch x sequence; default
                  128x128, 256x128 and 64x512: PubMedBERT's two phases): our step vs HF
                  BertForMaskedLM (SDPA attention), same dimensions, batch, bf16 autocast and
                  AdamW, and our step under the megatron engine (bf16 parameters); at the
                  first shape also our step on megatron's own linear and loss functions
                  (A/B of factory/train/plain_tp.py), HF's and ours with torch.compile'd
                  layers (training.compile), and profiles (OUT_DIR/bert_profile.txt).
  pretrain_stage  with --inputs (the vocab/ and pack/ of `factory run domains/biomedical.yaml
                  --scale smoke --until pack`): the real pretrain stage on the GPU (precision
                  auto -> bf16, attention auto -> SDPA), 40 steps, per engine in
                  STAGE_ENGINES (default torch, megatron and torch-compiled:
                  training.compile); then a resume from its step-30 checkpoint, whose
                  losses are compared with the uninterrupted run's.
GPU_CHECK_SECTIONS=bert_base,... runs only those sections. DRY_RUN=1 runs every section on
CPU at toy sizes (checks this script without a GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.train import attention, engine, loop, parallel, throughput  # noqa: E402
from factory.train.compiled import compile_layers  # noqa: E402
from factory.train.models import ModelConfig, build_model, pad_vocab  # noqa: E402
from factory.train.sizes import BERT_SIZES, GPT_SIZES  # noqa: E402

log = logging.getLogger("gpu_check")
DRY = os.environ.get("DRY_RUN") == "1"
PRECISION = "fp32" if DRY else "bf16"    # on CPU megatron's linear layers have no bf16 backward


class Synthetic:
    """TrainData's `batch(start, count)` over fixed random GPT tokens (no data loading in
    the measured step beyond the host-to-device copy the real loop also does)."""

    def __init__(self, vocab: int, seq: int, rows: int):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
        self.rows = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                     "loss_mask": torch.ones(rows, seq),
                     "position_ids": torch.arange(seq).expand(rows, seq).contiguous()}

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        return {k: v[:count] for k, v in self.rows.items()}


def check_exactness(results: dict) -> None:
    from factory.train.convert import save_hf
    from factory.train.export import max_logit_difference

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    dev = throughput.device()
    for fam, dims in (("bert", BERT_SIZES["smoke"]), ("gpt", GPT_SIZES["smoke"])):
        cfg = ModelConfig(family=fam, vocab_size=1000, padded_vocab_size=pad_vocab(1000),
                          max_position_embeddings=128, hidden_dropout=0.0,
                          attention_dropout=0.0,
                          **({"layernorm_epsilon": 1e-5} if fam == "gpt" else {}), **dims)
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, cfg, None, Path(tmp))
            with torch.no_grad():
                fp32 = max_logit_difference(model, cfg, Path(tmp))
                with loop.autocast("bf16", dev):
                    bf16 = max_logit_difference(model, cfg, Path(tmp))
        results[fam] = {"max_abs_logit_diff_fp32": fp32, "max_abs_logit_diff_bf16": bf16,
                        "ok": fp32 < 1e-3 and bf16 < 1.0}
        log.info("check %s: fp32 %.2e, bf16 %.2e", fam, fp32, bf16)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def gpt_1b(results: dict, out_dir: Path) -> None:
    """Per engine in GPT_ENGINES (default torch, torch-compiled, megatron) and micro batch in
    GPT_MICROS: the loop's own step; a profile of each engine's fastest micro batch
    (OUT_DIR/gpt_profile[_ENGINE].txt)."""
    seq = 64 if DRY else 2048
    micros = [2] if DRY else [int(m) for m in os.environ.get("GPT_MICROS", "4 8 16").split()]
    engines = os.environ.get("GPT_ENGINES", "torch torch-compiled megatron").split()
    steps = 3 if DRY else 8
    vocab = 1000 if DRY else 32768
    cfg = ModelConfig(family="gpt", vocab_size=vocab, padded_vocab_size=pad_vocab(vocab),
                      max_position_embeddings=seq, hidden_dropout=0.0, attention_dropout=0.0,
                      layernorm_epsilon=1e-5, tie_embeddings=False,
                      **GPT_SIZES["smoke" if DRY else "1b"])
    flops = loop.flops_per_token(cfg.num_layers, cfg.hidden_size, seq, cfg.matmul_parameters())
    results.update(seq=seq, flops_per_token=flops, runs={}, best_micro={})
    setup = SimpleNamespace(cfg=cfg, data=Synthetic(vocab, seq, max(micros)), seq=seq,
                            micros=micros, steps=steps, flops=flops,
                            peak=loop.peak_flops_per_s(), out_dir=out_dir)
    for name in engines:
        try:
            _gpt_engine(results, name, setup)
        except Exception as e:     # a variant that fails (no Triton, say) loses no other
            results["runs"].setdefault(name, {})["error"] = _error(e)
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _gpt_engine(results: dict, name: str, setup: SimpleNamespace) -> None:
    """gpt_1b for one GPT_ENGINES entry (ENGINE or ENGINE-compiled)."""
    from factory.train.schedule import LRSchedule

    cfg, data, seq, flops, peak = setup.cfg, setup.data, setup.seq, setup.flops, setup.peak
    engine_name, _, variant = name.partition("-")
    # The megatron engine's bf16 is bf16 parameters (no autocast), which runs on CPU too.
    precision = PRECISION if engine_name == "torch" else "bf16"
    torch.manual_seed(0)
    model, optimizer = engine.build(build_model(cfg).to(throughput.device()), engine.EngineConfig(
        name=engine_name, precision=precision, lr=3e-4, betas=(0.9, 0.95),
        weight_decay=0.1))
    if variant == "compiled":
        compile_layers(model)
    results["params"] = sum(p.numel() for p in engine.bare(model).parameters())

    def loop_cfg(micro: int):
        return loop.LoopConfig(
            family="gpt", total_steps=10**6, global_batch_size=micro,
            micro_batch_size=micro, seq_length=seq, engine=engine_name,
            schedule=LRSchedule(lr=3e-4, total_steps=10**6, warmup_steps=0),
            precision=precision, flops_per_token=flops)

    runs = results["runs"][name] = {}
    best = None
    # Compiled: at the uncompiled engine's best micro batch only (a second shape would
    # compile a second graph: a minute of the check's time).
    micros = [results["best_micro"].get(engine_name, max(setup.micros))] if variant else \
        setup.micros
    for micro in micros:
        lc = loop_cfg(micro)
        try:
            times, losses = [], []
            for i in range(3 + setup.steps):
                throughput._sync()
                t0 = time.perf_counter()
                m = loop.train_step(model, optimizer, data, lc, i + 1)
                throughput._sync()
                losses.append(m["loss"])
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError as e:
            runs[str(micro)] = {"error": f"out of memory: {e}"[:300]}
            torch.cuda.empty_cache()
            continue
        t = statistics.median(times)
        tps = micro * seq / t
        run = runs[str(micro)] = {
            "step_s": t, "tokens_per_s": tps, "mfu": tps * flops / peak if peak else None,
            "losses": losses,
            "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                               if torch.cuda.is_available() else None)}
        log.info("gpt 1b %s micro %d: %.3f s/step, %.0f tokens/s, MFU %s", name, micro, t,
                 tps, run["mfu"])
        if best is None or tps > runs[str(best)]["tokens_per_s"]:
            best = micro
    if best is not None:
        # What bounds the step: GPU time by kernel over two steps.
        results["best_micro"][name] = best
        lc = loop_cfg(best)
        prof, table = _profile(functools.partial(loop.train_step, model, optimizer,
                                                 data, lc, 100))
        suffix = "" if name == "torch" else f"_{name}"
        (setup.out_dir / f"gpt_profile{suffix}.txt").write_text(table + "\n")
        results.setdefault("profile_summary", {})[name] = _kernel_summary(prof)
        log.info("gpt 1b %s profile: %s", name, results["profile_summary"][name])


def _kernel_summary(prof) -> dict[str, float]:
    """Share of GPU kernel time by kind (GEMMs, attention, the rest) and kernel ms per step."""
    from torch.autograd import DeviceType

    buckets = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or "command buffer" in e.name.lower():
            continue    # CUPTI's "Command Buffer Full" is a launch-queue stall, not a kernel
        name = e.name.lower()
        kind = "attention" if any(k in name for k in ("flash", "fmha", "sdpa", "attention")) \
            else "gemm" if any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma")) \
            else "other"
        buckets[kind] += e.time_range.elapsed_us()
    total = sum(buckets.values())
    out = {f"{k}_share": v / total for k, v in buckets.items()} if total else {}
    out["kernel_ms_per_step"] = total / 1e3 / 2
    return out


def bert_base(results: dict, out_dir: Path) -> None:
    """Per shape in BERT_SHAPES (BATCHxSEQ): step times of HF and ours; profiles of the
    first shape."""
    shapes = ["4x32"] if DRY else os.environ.get("BERT_SHAPES", "128x128 256x128 64x512").split()
    steps = 3 if DRY else 20
    tables = []
    for n, shape in enumerate(shapes):
        batch, seq = (int(x) for x in shape.split("x"))
        cfg = ModelConfig(family="bert", vocab_size=30522, padded_vocab_size=pad_vocab(30522),
                          max_position_embeddings=512,
                          **BERT_SIZES["smoke" if DRY else "base"])
        backends = ("sdpa",) if DRY else ("sdpa", "local")
        runners = throughput.bert_runners(
            cfg, batch, seq, PRECISION, backends=backends, full_head=True,
            megatron_engine="bf16",
            extra={"its-tp-ops": lambda model: None} if n == 0 else None, compiled=n == 0)
        if n == 0:
            runners["megatron-its-tp-ops"] = throughput.on_megatron_tp_ops(
                runners["megatron-its-tp-ops"])
        errors = {}
        for name, step in list(runners.items()):   # a row that cannot run loses no other
            try:
                step()      # compiles a compiled row
            except Exception as e:
                errors[name] = _error(e)
                traceback.print_exc()
                del runners[name]
        med = throughput.time_interleaved(runners, steps, warmup=3)
        res = results[shape] = {
            "batch": batch, "seq": seq, "step_s": med, "errors": errors,
            "tokens_per_s": {k: batch * seq / v for k, v in med.items()},
            "speedup_vs_hf": {k: med["hf"] / v for k, v in med.items()}}
        log.info("bert base %s: %s", shape, res["speedup_vs_hf"])
        if n == 0:
            res["profile_summary"] = {}
            for name in ("hf", "megatron", "megatron-its-tp-ops", "megatron-engine",
                         "hf-compiled", "megatron-compiled"):
                if name not in runners:
                    continue
                prof, table = _profile(runners[name])
                tables.append(f"== {name} {shape}\n{table}")
                res["profile_summary"][name] = _kernel_summary(prof)
                res["profile_summary"][name]["cpu_ms_per_step"] = \
                    sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / 2
            log.info("bert base profile: %s", res["profile_summary"])
        del runners
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (out_dir / "bert_profile.txt").write_text("\n".join(tables) + "\n")


def _profile(step, steps: int = 2):
    """torch.profiler over `steps` calls of `step`: (profile, its top-40 table)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        throughput._sync()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof, prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)


def pretrain_stage(results: dict, inputs: Path, work: Path) -> None:
    """The real stage per engine in STAGE_ENGINES (ENGINE or ENGINE-compiled), then a
    resume from its step-30 checkpoint."""
    for name in os.environ.get("STAGE_ENGINES", "torch megatron torch-compiled").split():
        results[name] = {}
        try:
            _pretrain_stage(results[name], inputs, work / name, name)
        except Exception as e:     # one engine failing loses no other
            results[name]["error"] = _error(e)
            traceback.print_exc()


def _pretrain_stage(results: dict, inputs: Path, work: Path, name: str) -> None:
    from factory import manifest
    from factory.stage import StageContext
    from factory.train import checkpoint
    from factory.train.stage import PretrainStage

    engine_name, _, variant = name.partition("-")
    loaded = manifest.load(REPO / "domains" / "biomedical.yaml", scale="smoke",
                           overrides=[f"parallel.engine={engine_name}",
                                      f"training.compile={variant == 'compiled'}"])
    stage = PretrainStage.from_manifest(loaded)
    ins = {"vocab": inputs / "vocab", "pack": inputs / "pack"}
    first = work / "uninterrupted"
    first.mkdir(parents=True)
    t0 = time.perf_counter()
    headline = stage.run(StageContext(out=first, inputs=ins))
    results["seconds"] = time.perf_counter() - t0
    rows = loop.read_metrics(first / "metrics.jsonl")
    results.update(headline=headline, steps=len(rows),
                   precision=stage._loop_config().precision, attention=attention.backend(),
                   first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"],
                   mfu_logged="mfu" in rows[-1])
    # Resume: the same folder with the final checkpoint gone, as if killed after step 30.
    second = work / "resumed"
    shutil.copytree(first, second)
    ckpts = second / "checkpoints"
    kept = sorted(int(p.name[5:]) for p in ckpts.glob("iter_*"))
    resume_from = max(s for s in kept if s < len(rows))
    for s in kept:
        if s > resume_from:
            shutil.rmtree(checkpoint.iter_dir(ckpts, s))
    (ckpts / checkpoint.LATEST).write_text(f"{resume_from}\n")
    stage.run(StageContext(out=second, inputs=ins))
    again = loop.read_metrics(second / "metrics.jsonl")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(rows, again, strict=True)]
    results["resume"] = {"from_step": resume_from, "max_abs_loss_diff": max(diffs),
                         "max_abs_loss_diff_after_resume": max(diffs[resume_from:])}
    log.info("pretrain stage (%s engine): %s", name, results)


def _error(e: Exception) -> str:
    return f"{e.__class__.__name__}: {e}"[:2000]


def _triton_version() -> str | None:
    """What training.compile's GPU kernels need (torch's CUDA wheels ship it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--inputs", type=Path, help="a biomedical smoke run folder (vocab/, pack/)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parallel.init()
    results: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
        "attention_backend": attention.backend(), "peak_flops_per_s": loop.peak_flops_per_s()}
    log.info("%s", results)
    sections = [("check", check_exactness), ("gpt_1b", lambda r: gpt_1b(r, args.out_dir)),
                ("bert_base", lambda r: bert_base(r, args.out_dir))]
    if args.inputs:
        work = Path(tempfile.mkdtemp(prefix="gpu_check_stage_"))
        sections.append(("pretrain_stage", lambda r: pretrain_stage(r, args.inputs, work)))
    only = os.environ.get("GPU_CHECK_SECTIONS")     # e.g. "bert_base" to rerun one section
    if only:
        sections = [s for s in sections if s[0] in only.split(",")]
    failed = False
    for name, fn in sections:
        results[name] = {}
        t0 = time.perf_counter()
        try:
            fn(results[name])
        except Exception as e:     # keep what the other sections measure
            failed = True
            results[name]["error"] = _error(e)
            traceback.print_exc()
        results[name]["section_seconds"] = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        (args.out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
