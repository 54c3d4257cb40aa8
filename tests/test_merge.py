"""`factory merge`: weight-space merging of two HF checkpoints (tiny random BERTs here)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from factory.merge import _combine, merge
from factory.stage import UserError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         "the", "dose", "##s", "patient", "##ed"]


def bert_folder(path, seed, *, vocab=WORDS, shard=None, rows=None):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=rows or len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(cfg)
    path.mkdir(parents=True)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def load(path):
    from transformers import BertForMaskedLM

    from factory.hf_weights import from_pretrained

    return {k: v.detach() for k, v in from_pretrained(BertForMaskedLM, path).state_dict().items()}


def test_linear_merge_ends_and_middle_and_a_sharded_layout(tmp_path):
    a, wa = bert_folder(tmp_path / "a", 1, shard="40KB")   # several shards + an index
    b, wb = bert_folder(tmp_path / "b", 2)
    assert len(list(a.glob("*.safetensors"))) > 2
    for w in (0.0, 1.0, 0.3):
        out = tmp_path / f"m{w}"
        summary = merge(a, b, out, weight=w, method="linear")
        got = load(out)
        for k in wa:
            want = wa[k] if w == 0 else wb[k] if w == 1 else (1 - w) * wa[k] + w * wb[k]
            assert torch.allclose(got[k], want, atol=1e-6, rtol=0), (w, k)
            if w in (0.0, 1.0):
                assert torch.equal(got[k], want), (w, k)
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
            p.name for p in a.glob("*.safetensors"))
        assert (out / "tokenizer.json").read_text() == (a / "tokenizer.json").read_text()
        recorded = json.loads((out / "merge.json").read_text())
        assert recorded == summary and recorded["weight"] == w
        assert recorded["models"]["b"]["path"] == str(b.resolve())
        stored = {}
        for f in a.glob("*.safetensors"):
            stored.update(load_file(f))
        assert summary["parameters"] == sum(v.numel() for v in stored.values())


def test_slerp_keeps_the_norm_of_orthogonal_tensors_and_is_linear_on_parallel_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g)
    y = torch.randn(4096, generator=g)
    y = y - (y @ x) / (x @ x) * x          # orthogonal to x ...
    y = y * x.norm() / y.norm()            # ... and as long
    mid = _combine("w", x, y, 0.5, "slerp")
    assert math.isclose(mid.norm().item(), x.norm().item(), rel_tol=1e-4)
    assert math.isclose(_combine("w", x, y, 0.5, "linear").norm().item(),
                        x.norm().item() / math.sqrt(2), rel_tol=1e-4)  # linear shrinks it
    for t, want in ((0.0, x), (1.0, y)):
        assert torch.allclose(_combine("w", x, y, t, "slerp"), want, atol=1e-5)
    # nearly parallel tensors: the angle is meaningless, slerp is the linear merge
    assert torch.allclose(_combine("w", x, 2 * x, 0.5, "slerp"), 1.5 * x, atol=1e-5)
    assert torch.equal(_combine("w", torch.arange(3), torch.arange(3), 0.5, "slerp"),
                       torch.arange(3))


def test_slerp_merge_loads(tmp_path):
    a, _ = bert_folder(tmp_path / "a", 1)
    b, _ = bert_folder(tmp_path / "b", 2)
    merge(a, b, tmp_path / "m", weight=0.5, method="slerp")
    got, la, lb = load(tmp_path / "m"), load(a), load(b)
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(got[k], la[k]) and not torch.allclose(got[k], lb[k])


def test_unmergeable_models_are_refused_before_anything_is_written(tmp_path):
    a, _ = bert_folder(tmp_path / "a", 1)
    bigger, _ = bert_folder(tmp_path / "bigger", 2, vocab=[*WORDS, "##ing", "tumour"])
    i, j = WORDS.index("the"), WORDS.index("dose")
    order = list(WORDS)
    order[i], order[j] = order[j], order[i]
    swapped, _ = bert_folder(tmp_path / "swapped", 3, vocab=order)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((a / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"not read")
    cases = [(bigger, "shape .* share a vocabulary"),
             (swapped, "tokenizer maps 2 tokens differently"),
             (pickle, "only pickle weights")]
    for other, message in cases:
        with pytest.raises(UserError, match=message):
            merge(a, other, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()
    with pytest.raises(UserError, match=r"--weight 1.5: must lie in \[0, 1\]"):
        merge(a, a, tmp_path / "out", weight=1.5)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge(a, a, kept)
    assert (kept / "notes.txt").read_text() == "mine"


def test_cli_merges_and_refuses_in_one_line(factory_cli, tmp_path):
    a, wa = bert_folder(tmp_path / "a", 1)
    b, wb = bert_folder(tmp_path / "b", 2)
    r = factory_cli("merge", a, b, tmp_path / "m", "--weight", "0.25")
    assert r.returncode == 0, r.stderr[-2000:]
    k = "bert.encoder.layer.1.output.dense.weight"
    assert torch.allclose(load(tmp_path / "m")[k], 0.75 * wa[k] + 0.25 * wb[k], atol=1e-6)
    bigger, _ = bert_folder(tmp_path / "bigger", 2, vocab=[*WORDS, "##ing"])
    r = factory_cli("merge", a, bigger, tmp_path / "m2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bert.embeddings.word_embeddings.weight" in r.stderr
    assert not (tmp_path / "m2").exists()


def test_a_failure_while_writing_leaves_no_output(tmp_path):
    from safetensors.torch import save_file

    for name, ids in (("a", [0, 1, 2]), ("b", [0, 2, 1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "toy"}')
        save_file({"w": torch.ones(3), "z_ids": torch.tensor(ids)},
                  tmp_path / name / "model.safetensors")
    with pytest.raises(UserError, match="tensor z_ids: integer tensors differ"):
        merge(tmp_path / "a", tmp_path / "b", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def llama_folder(path, seed, tok, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenization.train import save_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      **config)
    save_tokenizer(tok, "byte_bpe", path)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_llama_export_merges_with_its_base_and_a_tied_one_is_refused(tmp_path, caplog):
    """The finance case: a continued export (its own max_position_embeddings) and its base."""
    from transformers import LlamaForCausalLM

    from factory.hf_weights import from_pretrained
    from tokenization.train import train_tokenizer

    docs = ["Accounts payable rose in the third quarter.", "The ledger balances.",
            "Depreciation is charged monthly on fixed assets."] * 20
    tok = train_tokenizer("byte_bpe", 300, "cased", 2, iter(docs))
    export = llama_folder(tmp_path / "export", 1, tok, max_position_embeddings=128,
                          tie_word_embeddings=False)
    base = llama_folder(tmp_path / "base", 2, tok, max_position_embeddings=8192,
                        tie_word_embeddings=False)
    with caplog.at_level("WARNING", logger="factory.merge"):
        merge(export, base, tmp_path / "m", weight=0.5)
    assert "max_position_embeddings" not in caplog.text       # a run's setting, not news
    merged = from_pretrained(LlamaForCausalLM, tmp_path / "m")
    assert merged.config.max_position_embeddings == 128        # A's config
    a = from_pretrained(LlamaForCausalLM, export).state_dict()
    b = from_pretrained(LlamaForCausalLM, base).state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, 0.5 * a[k] + 0.5 * b[k], atol=1e-6), k
    tied = llama_folder(tmp_path / "tied", 3, tok, tie_word_embeddings=True)
    with pytest.raises(UserError, match="has no tensor lm_head.weight"):
        merge(export, tied, tmp_path / "m2")


def test_a_head_the_bare_base_lacks_is_copied_only_when_asked(tmp_path):
    """The biomedical case: a continued BertForMaskedLM and its base, a bare BertModel (a
    sentence encoder: no `bert.` prefix, no MLM head)."""
    from transformers import BertModel

    a, wa = bert_folder(tmp_path / "a", 1)
    torch.manual_seed(2)
    bare = BertModel(load_config(a), add_pooling_layer=False)
    bare.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer.json").write_text((a / "tokenizer.json").read_text())
    with pytest.raises(UserError, match="has no tensor cls.predictions.bias .* --keep-a-extras"):
        merge(a, tmp_path / "bare", tmp_path / "m")
    summary = merge(a, tmp_path / "bare", tmp_path / "m", weight=0.5, keep_a_extras=True)
    got, wb = load(tmp_path / "m"), bare.state_dict()
    head = [k for k in got if k.startswith("cls.")]
    for k in wa:
        if k == "cls.predictions.decoder.weight":   # tied: the merged input embeddings
            assert torch.equal(got[k], got["bert.embeddings.word_embeddings.weight"])
        elif k.startswith("cls."):
            assert torch.equal(got[k], wa[k]), k
        else:
            want = 0.5 * wa[k] + 0.5 * wb[k.removeprefix("bert.")]
            assert torch.allclose(got[k], want, atol=1e-6), k
    assert summary["copied_from_a"] == 5 and len(head) >= 5


def load_config(folder):
    from transformers import BertConfig

    return BertConfig.from_pretrained(folder)


def test_a_padded_vocabulary_merges_with_the_unpadded_base(tmp_path):
    """The export keeps Megatron's vocabulary padding (rows past the tokenizer's last id)."""
    a, wa = bert_folder(tmp_path / "a", 1, rows=len(WORDS) + 4)
    b, wb = bert_folder(tmp_path / "b", 2)
    merge(a, b, tmp_path / "m", weight=0.5)
    got = load(tmp_path / "m")
    k, n = "bert.embeddings.word_embeddings.weight", len(WORDS)
    assert got[k].shape == wa[k].shape
    assert torch.allclose(got[k][:n], 0.5 * wa[k][:n] + 0.5 * wb[k], atol=1e-6)
    assert torch.equal(got[k][n:], wa[k][n:])
    # padding is only what lies past the tokenizer: fewer rows than tokens is refused
    short, _ = bert_folder(tmp_path / "short", 3, rows=len(WORDS) - 1)
    with pytest.raises(UserError, match="do not share a vocabulary"):
        merge(a, short, tmp_path / "m2")
