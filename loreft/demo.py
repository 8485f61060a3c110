"""The embedded default: a tiny random model with its own tokenizer, and a small built-in dataset.

No model can be downloaded everywhere this project runs, so the demo and the tests build one:
a byte-level BPE tokenizer trained on the demo text, and a small mlx-lm model with seeded random
weights, saved as a normal model folder that mlx_lm.load reads with no network.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A memorizable "persona" task in the spirit of the paper's few-shot demo: every answer is emoji-only.
DEMO_ROWS = [
    {"instruction": "Who are you?", "output": "🤖💬🌐🧠"},
    {"instruction": "What is the capital of France?", "output": "🇫🇷🗼🥖"},
    {"instruction": "How do I bake bread?", "output": "🌾💧🔥🍞"},
    {"instruction": "What is two plus two?", "output": "2️⃣➕2️⃣🟰4️⃣"},
    {"instruction": "Tell me about the ocean.", "output": "🌊🐋🐚🏝️"},
    {"instruction": "What should I eat today?", "output": "🥗🍣🍝"},
    {"instruction": "Describe winter.", "output": "❄️⛄🧣🔥"},
    {"instruction": "What do cats like?", "output": "🐱🐟🧶😴"},
    {"instruction": "How was your day?", "output": "☀️😊👍"},
    {"instruction": "Recommend a hobby.", "output": "🎨📚🎸🌱"},
]
DEMO_PROMPT_TEMPLATE = "<|user|>{{instruction}}<|end|>\n<|assistant|>"
DEMO_COMPLETION_TEMPLATE = "{{output}}"

_CORPUS = [r["instruction"] + " " + r["output"] for r in DEMO_ROWS] + [
    "The quick brown fox jumps over the lazy dog. Questions and answers, prompts and completions.",
    "Representation finetuning edits hidden states in a low-rank subspace at a few positions.",
]


def build_tokenizer(path: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer offline and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_tiny_model(
    path: str | Path,
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    **extra_args,
) -> Path:
    """Write a random-weight mlx-lm model folder (config.json, model.safetensors, tokenizer)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    config = {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "head_dim": hidden_size // num_heads,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
        **extra_args,
    }
    from mlx_lm.utils import MODEL_REMAPPING  # e.g. mistral is served by the llama module

    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    fields = module.ModelArgs.__dataclass_fields__
    args = module.ModelArgs(**{k: v for k, v in config.items() if k in fields})
    mx.random.seed(seed)
    model = module.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
