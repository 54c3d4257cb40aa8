"""Model size presets per family (plain data: importing this must not import megatron).

`smoke` is for CI, `tiny` for the CPU demo; the rest are the published shapes.
"""

BERT_SIZES: dict[str, dict[str, int]] = {
    "smoke": dict(num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=256),
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024),
    "mini": dict(num_layers=6, hidden_size=384, num_attention_heads=12, ffn_hidden_size=1536),
    # Devlin et al. 2019, Table 1; PubMedBERT and SOBert use base and large.
    "base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096),
}

GPT_SIZES: dict[str, dict[str, int]] = {
    "smoke": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=192),
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=4,
                 ffn_hidden_size=688),
    # SmolLM2-135M's shape.
    "135m": dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                 ffn_hidden_size=1536),
    # Llama-3.2-1B's shape.
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192),
}

SIZES = {"bert": BERT_SIZES, "gpt": GPT_SIZES}
