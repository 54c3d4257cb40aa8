"""Two processes on CPU (torchrun, gloo): tensor parallel 2 and data parallel 2 train like one
process, dist_checkpointing reshards TP2 <-> TP1, and a SIGKILLed TP=2 run resumes exactly.

All of it runs the real pretrain stage on every rank (tests/train/dist_worker.py), as the
runner does under torchrun. Dropout is 0 so TP=2 and TP=1 draw the same function.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import REPO, pretrain_stage
from tests.train.test_resume import kill_after_checkpoint

STEPS, INTERVAL = 12, 4
COMMON = (f"training.steps={STEPS}", f"training.checkpoint_interval={INTERVAL}",
          "model.hidden_dropout=0", "model.attention_dropout=0",
          # Held-out evaluations at 4, 8, 12: split over data-parallel ranks, forward-only
          # through the pipeline schedule, they must give the one-process val_loss too.
          f"training.eval_interval={INTERVAL}", "training.eval_samples=12")


def probe_batch(vocab: int = 2048):
    """A fixed padded batch of token ids under `vocab` (the smoke vocabulary by default)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    return ids, mask


def _torchrun(plan: dict, path: Path) -> list[str]:
    path.write_text(json.dumps(plan))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "tests.train.dist_worker", str(path)]


def _launch_killed_then_rerun(plan: dict, attempt: Path, tmp_path: Path,
                              keep: Path | None = None) -> None:
    """Launch `plan`, whose last job trains into `attempt`; SIGKILL the launch right after
    that job's checkpoint INTERVAL; copy the killed folder to `keep` if given; rerun the last
    job alone in a new launch."""
    assert kill_after_checkpoint(_torchrun(plan, tmp_path / "plan.json"), attempt, INTERVAL,
                                 timeout=300) == INTERVAL
    assert len(_rows(attempt)) < STEPS, "the kill came too late to test anything"
    if keep is not None:
        shutil.copytree(attempt, keep)
    rerun = {**plan, "jobs": plan["jobs"][-1:]}
    done = subprocess.run(_torchrun(rerun, tmp_path / "rerun.json"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _run_single(tmp_path: Path, family: str, inputs: dict[str, Path], *overrides: str) -> None:
    """The one-process reference run, into tmp_path/single."""
    from factory.stage import MemoryLog, StageContext

    (tmp_path / "single").mkdir()
    pretrain_stage(family, *overrides).run(StageContext(out=tmp_path / "single", inputs=inputs,
                                                        log=MemoryLog()))


def _assert_trains_like_single(tmp_path: Path, names: tuple[str, ...], loss_abs: float = 1e-5,
                               norm_rel: float = 1e-4) -> list[float]:
    """Each run under tmp_path/NAME has the losses and grad norms of tmp_path/single."""
    reference = _losses(tmp_path / "single")
    assert reference[-1] < reference[0] - 0.2, "the run did not learn: a vacuous comparison"
    norms = [r["grad_norm"] for r in _rows(tmp_path / "single")]
    for name in names:
        assert _losses(tmp_path / name) == pytest.approx(reference, abs=loss_abs), name
        assert [r["grad_norm"] for r in _rows(tmp_path / name)] == pytest.approx(
            norms, rel=norm_rel), name
        assert _val(tmp_path / name) == pytest.approx(_val(tmp_path / "single"),
                                                      abs=loss_abs), name
    return reference


def _assert_reads_back_whole(tmp_path: Path, family: str, vocab: int, name: str) -> None:
    """The checkpoint of tmp_path/NAME (written with pipeline stages) read back into one PP=1
    model gives the logits of tmp_path/single's."""
    import torch

    from factory.train import parallel
    from factory.train.export import load_checkpoint_model

    parallel.init()
    ids, mask = probe_batch(vocab)
    args = (ids, mask) if family == "bert" else \
        (ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    with torch.no_grad():
        ours, theirs = (load_checkpoint_model(tmp_path / n).eval()(*args)
                        for n in ("single", name))
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-4


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _val(out: Path) -> list[float]:
    """The held-out losses of COMMON's evaluations (steps 4, 8, 12)."""
    rows = [r for r in _rows(out) if "val_loss" in r]
    assert [r["step"] for r in rows] == list(range(INTERVAL, STEPS + 1, INTERVAL)), out
    return [r["val_loss"] for r in rows]


def _logits(pretrain: Path):
    import torch

    from factory.train import parallel
    from factory.train.export import load_checkpoint_model

    parallel.init()
    model = load_checkpoint_model(pretrain).eval()
    ids, mask = probe_batch()
    with torch.no_grad():
        return model(ids, mask)


@pytest.mark.slow  # two 2-process launches: about 80 s on 2 cores
def test_tensor_and_data_parallel_match_one_process_and_resume_exactly(bert_inputs, tmp_path):
    import torch


    # One process, TP=1: the reference.
    _run_single(tmp_path, "bert", bert_inputs, *COMMON)
    single = tmp_path / "single"
    reference = _losses(single)

    # Launch 1: a TP=2 run, a DP=2 run, the TP=1 checkpoint loaded at TP=2, then a second TP=2
    # run SIGKILLed (with its launch) right after its checkpoint 4. Launch 2 reruns that one.
    attempt = tmp_path / "attempt"
    plan = {"vocab": str(bert_inputs["vocab"]), "pack": str(bert_inputs["pack"]), "jobs": [
        {"kind": "train", "out": str(tmp_path / "tp2"), "overrides": [*COMMON,
                                                                      "parallel.tensor=2"]},
        {"kind": "train", "out": str(tmp_path / "dp2"), "overrides": list(COMMON)},
        {"kind": "train", "out": str(tmp_path / "tp2_sp"),
         "overrides": [*COMMON, "parallel.tensor=2", "parallel.sequence_parallel=true"]},
        {"kind": "logits", "pretrain": str(single), "tensor": 2,
         "out": str(tmp_path / "tp1_at_tp2.pt")},
        {"kind": "import", "hf": str(tmp_path / "llama"), "tensor": 2,
         "out": str(tmp_path / "llama_tp2.pt")},
        {"kind": "import", "hf": str(tmp_path / "bert"), "tensor": 2,
         "out": str(tmp_path / "bert_tp2.pt")},
        {"kind": "train", "out": str(attempt), "overrides": [*COMMON, "parallel.tensor=2"]},
    ]}
    hf_logits = _hf_bases(tmp_path)
    _launch_killed_then_rerun(plan, attempt, tmp_path)

    tp2, dp2 = _losses(tmp_path / "tp2"), _losses(tmp_path / "dp2")
    assert tp2 == pytest.approx(reference, abs=1e-4)
    assert _losses(tmp_path / "tp2_sp") == pytest.approx(reference, abs=1e-4)
    assert dp2 == pytest.approx(reference, abs=1e-5)
    assert reference[-1] < reference[0] - 0.2, "the run did not learn: a vacuous comparison"
    val = _val(single)
    assert val[-1] < val[0] - 0.1, "held-out loss did not move: a vacuous comparison"
    assert _val(tmp_path / "dp2") == pytest.approx(val, abs=1e-5)
    assert _val(tmp_path / "tp2") == pytest.approx(val, abs=1e-4)
    assert _val(tmp_path / "tp2_sp") == pytest.approx(val, abs=1e-4)
    # The grad norm counts each parameter once across TP ranks (clipping is active: norm > 1).
    norms = {name: [r["grad_norm"] for r in _rows(tmp_path / name)]
             for name in ("single", "tp2", "dp2", "tp2_sp")}
    assert max(norms["single"]) > 1.0
    assert norms["tp2"] == pytest.approx(norms["single"], rel=1e-3)
    # Sequence parallel: each norm's gradient is summed over the two sequence halves.
    assert norms["tp2_sp"] == pytest.approx(norms["single"], rel=1e-3)
    assert norms["dp2"] == pytest.approx(norms["single"], rel=1e-4)
    # Checkpoints are collective: one extra file per rank, one model folder.
    extra = sorted(p.name for p in (tmp_path / "tp2" / "checkpoints" / "iter_0000012" /
                                    "extra").iterdir())
    assert extra == ["rank00000.pt", "rank00001.pt"]
    assert json.loads((tmp_path / "tp2" / "model.json").read_text())["family"] == "bert"

    # Resharding: the TP=1 checkpoint read at TP=2 gives the TP=1 logits; the TP=2
    # checkpoint read at TP=1 gives logits as close as the two runs' losses.
    ours = _logits(single)
    at_tp2 = torch.load(tmp_path / "tp1_at_tp2.pt", weights_only=True)
    assert (at_tp2 - ours).abs().max().item() < 1e-4
    tp2_at_tp1 = _logits(tmp_path / "tp2")
    assert (tp2_at_tp1 - ours).abs().max().item() < 1e-2

    # Continued pretraining at TP=2: a HF Llama (GQA, SwiGLU, untied) and a HF BERT imported
    # straight into TP=2 models give the HF logits.
    keep = probe_batch(500)[1].bool()           # BERT: real tokens (pad rows are not HF's)
    for name, theirs in hf_logits.items():
        ours = torch.load(tmp_path / f"{name}_tp2.pt", weights_only=True)[..., :500]
        if name == "bert":
            ours, theirs = ours[keep], theirs[keep]
        assert theirs.abs().max() > 1.0
        assert (ours - theirs).abs().max().item() < 1e-4, name

    # The killed TP=2 run, rerun: the losses are the uninterrupted TP=2 run's.
    assert _losses(attempt) == pytest.approx(tp2, abs=1e-6)
    assert _val(attempt) == pytest.approx(_val(tmp_path / "tp2"), abs=1e-6)

    # Its optimizer state is cut for TP=2: resumed in one process it is refused.
    _assert_layout_change_refused(tmp_path / "tp2", bert_inputs, *COMMON)


def _assert_layout_change_refused(out: Path, inputs: dict[str, Path], *overrides: str) -> None:
    """A TP=2 run's folder resumed at TP=1 (one process): one clear error, no file changed
    (the data cache may gain an index for the new layout)."""
    from factory.stage import MemoryLog, StageContext, UserError

    def files():
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(UserError, match="written at tensor 2 / pipeline 1 / virtual_pipeline "
                                        "1, this run is tensor 1 / pipeline 1"):
        pretrain_stage("bert", *overrides).run(StageContext(out=out, inputs=inputs,
                                                            log=MemoryLog()))
    after = files()
    assert [p.name for p, data in before.items() if after.get(p) != data] == []


def _hf_bases(tmp_path: Path) -> dict:
    """A tiny HF Llama and BERT under tmp_path; their logits on the probe batch."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from tests.train.test_convert import _tiny_llama

    llama = _tiny_llama(tmp_path / "llama", tie=False)
    torch.manual_seed(3)
    bert = BertForMaskedLM(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      max_position_embeddings=64, initializer_range=0.2)).eval()
    bert.save_pretrained(tmp_path / "bert")
    ids, mask = probe_batch(500)
    with torch.no_grad():
        theirs = {"llama": llama(input_ids=ids).logits,
                  "bert": bert(input_ids=ids, attention_mask=mask).logits}
    return theirs


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")] \
        if path.exists() else []


def _tiny_llama_base(folder: Path, vocab: int, layers: int = 2):
    """A HF Llama (GQA, tied embeddings) with `vocab` rows, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.05)).save_pretrained(folder)


@pytest.mark.slow  # two 2-process launches: about 80 s on 2 cores
def test_pipeline_parallel_matches_one_process(gpt_inputs, tmp_path):
    """PP=2 (megatron's 1F1B schedule over gloo) trains a continued GPT with tied embeddings
    (the first stage's embedding and the last stage's output layer kept equal) exactly like one
    process, its checkpoint reads back whole at PP=1, and a SIGKILLed PP=2 run resumes
    exactly."""

    from factory.train import data

    vocab = data.load_tokenizer(gpt_inputs["vocab"] / "tokenizer").vocab_size
    _tiny_llama_base(tmp_path / "llama", vocab)
    overrides = [*COMMON, "strategy=continued", f"base.path={tmp_path / 'llama'}",
                 "model.size=null", "tokenizer=null"]
    _run_single(tmp_path, "gpt", gpt_inputs, *overrides)
    # Launch 1: a PP=2 run, one with the megatron engine (its DDP buffers, the tied-embedding
    # sum in finalize_model_grads), then one SIGKILLed (with its launch) after checkpoint 4.
    attempt = tmp_path / "attempt"
    plan = {"vocab": str(gpt_inputs["vocab"]), "pack": str(gpt_inputs["pack"]), "jobs": [
        {"kind": "train", "family": "gpt", "out": str(out),
         "overrides": [*overrides, "parallel.pipeline=2", *more]}
        for out, more in ((tmp_path / "pp2", []),
                          (tmp_path / "pp2_megatron", ["parallel.engine=megatron"]),
                          (tmp_path / "tp2_sp", ["parallel.pipeline=1", "parallel.tensor=2",
                                                 "parallel.sequence_parallel=true"]),
                          (attempt, []))]}
    _launch_killed_then_rerun(plan, attempt, tmp_path)

    _assert_trains_like_single(tmp_path, ("pp2", "pp2_megatron"))
    _assert_trains_like_single(tmp_path, ("tp2_sp",), loss_abs=1e-4, norm_rel=1e-3)
    extra = sorted(p.name for p in (tmp_path / "pp2" / "checkpoints" / "iter_0000012" /
                                    "extra").iterdir())
    assert extra == ["rank00000.pt", "rank00001.pt"]
    # Resumed after the kill.
    assert _losses(attempt) == pytest.approx(_losses(tmp_path / "pp2"), abs=1e-6)
    _assert_reads_back_whole(tmp_path, "gpt", vocab, "pp2")


@pytest.mark.slow  # two 2-process launches: about 35 s on 2 cores
def test_megatron_engine_data_parallel_matches_and_resumes(bert_inputs, tmp_path):
    """parallel.engine megatron at DP=2 (megatron DDP over several buckets, reduce-scatter
    into the distributed optimizer) and at TP=2 trains like one torch-engine process;
    SIGKILLed after checkpoint 4 it resumes exactly at DP=2, and its sharded optimizer state
    resumes in one process too (resharded DP2 -> DP1)."""
    import torch

    from factory.stage import MemoryLog, StageContext
    from tests.train.test_engine import _bert

    _run_single(tmp_path, "bert", bert_inputs, *COMMON)
    megatron = [*COMMON, "parallel.engine=megatron", "parallel.ddp_bucket_size=20000"]
    attempt = tmp_path / "attempt"
    plan = {"vocab": str(bert_inputs["vocab"]), "pack": str(bert_inputs["pack"]), "jobs": [
        {"kind": "train", "out": str(out), "overrides": [*megatron, *more]}
        for out, more in ((tmp_path / "tp2", ["parallel.tensor=2"]),
                          (tmp_path / "tp2_sp", ["parallel.tensor=2",
                                                 "parallel.sequence_parallel=true"]),
                          (tmp_path / "dp2", []), (attempt, []))]}
    plan["jobs"].insert(-1, {"kind": "main_weights", "out": str(tmp_path / "main.pt")})
    _launch_killed_then_rerun(plan, attempt, tmp_path, keep=tmp_path / "attempt_dp1")

    reference, dp2 = _losses(tmp_path / "single"), _losses(tmp_path / "dp2")
    assert reference[-1] < reference[0] - 0.2, "the run did not learn: a vacuous comparison"
    assert dp2 == pytest.approx(reference, abs=1e-5)
    assert _val(tmp_path / "dp2") == pytest.approx(_val(tmp_path / "single"), abs=1e-5)
    assert _losses(tmp_path / "tp2") == pytest.approx(reference, abs=1e-4)
    assert _losses(tmp_path / "tp2_sp") == pytest.approx(reference, abs=1e-4)
    norms = [[r["grad_norm"] for r in _rows(tmp_path / name)]
             for name in ("single", "dp2", "tp2", "tp2_sp")]
    assert max(norms[0]) > 1.0                                  # clipping was active
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    assert norms[2] == pytest.approx(norms[0], rel=1e-3)        # each TP shard counted once
    assert norms[3] == pytest.approx(norms[0], rel=1e-3)
    last = tmp_path / "dp2" / "checkpoints" / "iter_0000012"
    assert (last / "optimizer" / "metadata.json").is_file()
    assert _losses(attempt) == pytest.approx(dp2, abs=1e-6)     # resumed after the kill

    # The DP=2 checkpoint 4 resumed by one process: the optimizer state is regathered.
    pretrain_stage("bert", *megatron).run(StageContext(
        out=tmp_path / "attempt_dp1", inputs=bert_inputs, log=MemoryLog()))
    assert _losses(tmp_path / "attempt_dp1") == pytest.approx(dp2, abs=1e-5)
    # Not over tensor parallel: the TP=2 state resumed at TP=1 is refused.
    _assert_layout_change_refused(tmp_path / "tp2", bert_inputs, *megatron)

    # bf16 with loaded weights: each rank's main-weight shard holds its part of the exact
    # fp32 values (ZeRO-1 slices), not their bf16 rounding.
    shards = torch.load(tmp_path / "main.pt", weights_only=True)
    exact = torch.cat([p.detach().flatten() for p in _bert(3).parameters()])
    assert len(shards) == 2 and all(0 < len(s) < len(exact) for s in shards)
    assert torch.equal(torch.cat(shards).sort().values, exact.sort().values)


def _tiny_bert_base(folder: Path, vocab: int):
    """A 4-layer HF BertForMaskedLM with `vocab` rows, saved to `folder`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(13)
    BertForMaskedLM(BertConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=512, initializer_range=0.05,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(folder)


@pytest.mark.slow  # one 2-process launch: about 30 s on 2 cores
def test_bert_pipeline_parallel_matches_one_process(bert_inputs, tmp_path):
    """PP=2 for the HF-exact BERT (embeddings on the first stage, the MLM head and the tied
    decoder copy on the last), with either engine and with two interleaved model chunks per
    rank, trains a continued BERT like one process; the two stages' shards read back into one
    PP=1 model give its logits."""

    from factory.train import data

    vocab = data.load_tokenizer(bert_inputs["vocab"] / "tokenizer").vocab_size
    _tiny_bert_base(tmp_path / "bert", vocab)
    overrides = [*COMMON, "strategy=continued", f"base.path={tmp_path / 'bert'}",
                 "model.size=null", "tokenizer=null", "parallel.pipeline=2"]
    _run_single(tmp_path, "bert", bert_inputs, *overrides[:-1])
    plan = {"vocab": str(bert_inputs["vocab"]), "pack": str(bert_inputs["pack"]), "jobs": [
        {"kind": "train", "out": str(tmp_path / "pp2"), "overrides": overrides},
        {"kind": "train", "out": str(tmp_path / "pp2_megatron"),
         "overrides": [*overrides, "parallel.engine=megatron"]},
        {"kind": "train", "out": str(tmp_path / "vpp"),
         "overrides": [*overrides, "parallel.virtual_pipeline=2"]}]}
    done = subprocess.run(_torchrun(plan, tmp_path / "plan.json"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    _assert_trains_like_single(tmp_path, ("pp2", "pp2_megatron", "vpp"))
    _assert_reads_back_whole(tmp_path, "bert", vocab, "pp2")


@pytest.mark.slow  # two 2-process launches: about 60 s on 2 cores
def test_interleaved_pipeline_matches_one_process_and_resumes(gpt_inputs, tmp_path):
    """PP=2 with two model chunks per rank (megatron's interleaved 1F1B; a 4-layer GPT: rank 0
    holds layers 1 and 3, rank 1 layers 2 and 4), with either engine, trains like one
    process; SIGKILLed after checkpoint 4 (megatron engine: a DDP and an optimizer state over
    two chunks) it resumes exactly, and its chunked checkpoint reads back whole at PP=1."""

    from factory.train import data

    vocab = data.load_tokenizer(gpt_inputs["vocab"] / "tokenizer").vocab_size
    _tiny_llama_base(tmp_path / "llama", vocab, layers=4)
    overrides = [*COMMON, "strategy=continued", f"base.path={tmp_path / 'llama'}",
                 "model.size=null", "tokenizer=null"]
    _run_single(tmp_path, "gpt", gpt_inputs, *overrides)
    interleaved = [*overrides, "parallel.pipeline=2", "parallel.virtual_pipeline=2"]
    attempt = tmp_path / "attempt"
    plan = {"vocab": str(gpt_inputs["vocab"]), "pack": str(gpt_inputs["pack"]), "jobs": [
        {"kind": "train", "family": "gpt", "out": str(out), "overrides": [*interleaved, *more]}
        for out, more in ((tmp_path / "vpp", []),
                          (tmp_path / "vpp_megatron", ["parallel.engine=megatron"]),
                          (attempt, ["parallel.engine=megatron"]))]}
    dims = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                vocab_size=vocab, padded_vocab_size=vocab, max_position_embeddings=64)
    plan["jobs"].insert(0, {"kind": "layers", "family": "gpt", "overrides": interleaved,
                            "dims": dims, "out": str(tmp_path / "layers")})
    _launch_killed_then_rerun(plan, attempt, tmp_path)
    # The manifest's layout made chunks: virtual stage i * PP + r holds layer i * PP + r + 1.
    held = [json.loads((tmp_path / f"layers-{r}.json").read_text()) for r in (0, 1)]
    assert held == [[[1], [3]], [[2], [4]]]

    _assert_trains_like_single(tmp_path, ("vpp", "vpp_megatron"))
    assert _losses(attempt) == pytest.approx(_losses(tmp_path / "vpp_megatron"), abs=1e-6)
    _assert_reads_back_whole(tmp_path, "gpt", vocab, "vpp")
