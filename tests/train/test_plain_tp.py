"""factory/train/plain_tp.py: at tensor parallel 1 megatron's linears and loss run as torch's
F.linear and F.cross_entropy, without megatron's Python autograd functions, and compute the
same."""

from __future__ import annotations


def _python_functions(loss) -> set[str]:
    """Names of the autograd nodes behind `loss` that are Python autograd functions."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.endswith("Backward") and hasattr(node, "_forward_cls"):
            names.add(node._forward_cls.__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_plain_ops_match_megatrons_without_python_autograd_functions():
    import torch

    from factory.train import parallel, plain_tp
    from factory.train.models import ModelConfig, build_model

    parallel.init(seed=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(
        family="bert", num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128,
        vocab_size=512, padded_vocab_size=512, max_position_embeddings=128,
        hidden_dropout=0.0, attention_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 512, (2, 16), generator=g)
    mask = torch.ones_like(ids)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(ids, mask, tokentype_ids=torch.zeros_like(ids), lm_labels=ids).mean()
        functions = _python_functions(loss)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
            functions

    loss, grads, functions = run()
    with plain_tp.megatron_path():
        ref_loss, ref_grads, ref_functions = run()
    megatrons = {"LinearWithGradAccumulationAndAsyncCommunication", "_CopyToModelParallelRegion",
                 "_ReduceFromModelParallelRegion", "_VocabParallelCrossEntropy"}
    assert megatrons <= ref_functions
    assert not functions & megatrons
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6, rtol=1e-5), name


def test_takes_tells_which_linears_run_plain():
    """ComputeDtypeBiasLinear asks `takes` whether F.linear (bias fused in the compute dtype)
    already runs its layer; the answer follows the installed path and the layer's settings."""
    from factory.train import parallel, plain_tp
    from factory.train.models import ModelConfig, build_model

    parallel.init(seed=3)
    model = build_model(ModelConfig(
        family="bert", num_layers=1, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128,
        vocab_size=512, padded_vocab_size=512, max_position_embeddings=128))
    qkv = model.encoder.layers[0].self_attention.linear_qkv
    assert plain_tp.takes(qkv)
    with plain_tp.megatron_path():
        assert not plain_tp.takes(qkv)
    qkv.sequence_parallel = True            # megatron's gather is needed: its function runs
    assert not plain_tp.takes(qkv)


def test_cross_entropy_equals_megatrons_and_reads_nothing_back():
    """At tensor parallel 1 the loss is megatron's to the bit (fp32 and bf16 logits, loss and
    gradient) without its boolean-mask writes, which read the mask back (a GPU sync each)."""
    import contextlib

    import megatron.core.tensor_parallel as tp
    import torch

    from factory.train import parallel, plain_tp
    from factory.train.throughput import host_reads

    parallel.init(seed=3)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(7, 3, 50, generator=g) * 4).to(dtype)
        target = torch.randint(0, 50, (7, 3), generator=g)
        weight = torch.randn(7, 3, generator=g)
        results, reads = [], []
        for path in (plain_tp.megatron_path(), contextlib.nullcontext()):
            with path:
                x = logits.clone().requires_grad_()
                out = {}

                def step():
                    # x * 1: megatron's loss overwrites fp32 logits in place, as ours does.
                    out["loss"] = tp.vocab_parallel_cross_entropy(x * 1, target)
                    (out["loss"] * weight).sum().backward()

                reads.append(host_reads(step))
                results.append((out["loss"].detach(), x.grad))
        (theirs, their_grad), (ours, our_grad) = results
        assert torch.equal(ours, theirs) and torch.equal(our_grad, their_grad), dtype
        assert our_grad.dtype == dtype
        reference = torch.nn.functional.cross_entropy(
            logits.float().view(-1, 50), target.view(-1), reduction="none").view(7, 3)
        assert torch.allclose(ours, reference, atol=1e-5)
        assert reads == [2, 0]
