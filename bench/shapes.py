"""Model shapes for the benchmark (config dicts, random weights: nothing is downloaded) and their FLOPs.

Plain Python only: the pyreft worker imports this file by path, in a venv without MLX.
"""

from __future__ import annotations

# mlx-lm / transformers config.json fields. The GPU shapes copy the public configs of Qwen2-0.5B and
# Llama-3.2-1B; "llama-small" is a small Llama that trains in seconds on two CPU cores.
SHAPES: dict[str, dict] = {
    "llama-small": {
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {  # SmolLM2-135M(-Instruct)'s config: the real model CPU users train (random weights here)
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def forward_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x every matmul weight (LM head included) + causal attention scores."""
    d, hd = cfg["hidden_size"], head_dim(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * cfg["intermediate_size"]
    weights = cfg["num_hidden_layers"] * per_layer + d * cfg["vocab_size"]
    # QK^T and AV: 2 matmuls x 2 FLOPs x heads x head_dim x (average causal context ~ seq_len / 2)
    attention = cfg["num_hidden_layers"] * 4 * heads * hd * (seq_len + 1) / 2
    return 2.0 * weights + attention


def train_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Model FLOPs per trained token: forward + the input-gradient half of backward (base weights are frozen).

    Adapter FLOPs (LoReFT, LoRA) are tiny next to this and not counted, so every method is scored against
    the same number: utilization = tokens/s x this / the measured matmul peak.
    """
    return 2.0 * forward_flops_per_token(cfg, seq_len)


def param_count(cfg: dict) -> int:
    """Base parameters (tied embeddings counted once; norms and biases left out)."""
    d, hd = cfg["hidden_size"], head_dim(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * cfg["intermediate_size"]
    head = 0 if cfg.get("tie_word_embeddings", True) else d * cfg["vocab_size"]
    return cfg["num_hidden_layers"] * per_layer + d * cfg["vocab_size"] + head


def build_model(shape: str, dtype: str, seed: int = 0):
    """A random-weight mlx-lm model of the named shape (nothing downloaded)."""
    import importlib

    import mlx.core as mx

    config = SHAPES[shape]
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def every_token_inputs(reft, tokens, shards: int) -> list[tuple]:
    """A training step's inputs with every next-token target supervised and the edit's prompt the whole row.

    Not a prompt/completion Batch (whose first target is never supervised); the rows split into `shards`
    parts as loreft.trainer.staged splits a Batch's (loreft.data.row_groups).
    """
    import mlx.core as mx

    from loreft.data import row_groups

    T = tokens.shape[1] - 1
    return [(mx.array(tokens[rows]), mx.ones((len(rows), T)), reft.locations([T] * len(rows)).as_arrays(), None,
             mx.array(tokens[rows].size)) for rows in row_groups(tokens.shape[0], shards)]
