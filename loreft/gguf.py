"""Import a GGUF file (llama.cpp's format) as an mlx-lm model folder, keeping its quantization.

mx.load reads GGUF tensors, turning the Q4_0, Q4_1 and Q8_0 blocks into MLX's own affine layout
(packed uint32 weights, scales and biases, groups of 32). What is left to do here: check what the file
holds before loading it (read_header), rename the tensors to mlx-lm's llama names, undo llama.cpp's
reordering of the query and key rows, and rebuild config.json and the tokenizer from the metadata.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError

# ggml tensor types (llama.cpp's ggml.h); the ones mx.load turns into MLX arrays without loss are supported
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
ARCHITECTURES = ("llama",)  # llama.cpp writes Llama 1-3, Mistral, SmolLM and TinyLlama files as "llama"
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe")
FORMAT_VERSION = 1  # of the folders convert() writes; raise it when they change (cached conversions are redone)

# llama.cpp tensor names -> mlx-lm llama names
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Llama 3's pre-tokenizer split (the regex of its tokenizer.json)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / MLX order (the file stores it reversed)
    type: str


# ---------------------------------------------------------------------------------------------------
# Reading the header (metadata and tensor list) without loading any tensor


class _Reader:
    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}

    def __init__(self, file):
        self.file = file

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.file.read(size)
        if len(data) != size:
            raise EOFError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.file.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item == 8:
                return [self.string() for _ in range(count)]
            if item in self._NUMPY:
                dtype = np.dtype(self._NUMPY[item])
                return np.frombuffer(self.file.read(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(item) for _ in range(count)]
        if kind in self._SCALARS:
            return self.unpack(self._SCALARS[kind])
        raise ValueError(f"unknown metadata value type {kind}")


def read_header(path: str | Path) -> tuple[dict, list[TensorInfo]]:
    """The file's metadata (key -> value) and its tensors' names, shapes and ggml types; no tensor data is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError("model", str(path), "not a GGUF file (no GGUF magic at its start)")
            r = _Reader(f)
            version = r.unpack("<I")
            if version < 2:
                raise ConfigError("model", str(path), f"GGUF version {version} is too old; versions 2 and 3 are read")
            n_tensors, n_keys = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_keys):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
                kind = r.unpack("<I")
                r.unpack("<Q")  # offset in the data section
                tensors.append(TensorInfo(name, tuple(reversed(dims)), GGML_TYPES.get(kind, f"type {kind}")))
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("model", str(path), f"not a readable GGUF file ({e})") from None
    return metadata, tensors


def check_supported(path: str | Path, metadata: dict, tensors: list[TensorInfo]) -> None:
    """Raise a one-line ConfigError naming the first thing in the file this importer cannot convert."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError("model", str(path), f"GGUF architecture {arch!r} is not supported; supported: "
                                              f"{', '.join(ARCHITECTURES)}")
    for t in tensors:
        if t.type not in SUPPORTED_TYPES:
            raise ConfigError("model", str(path), f"tensor {t.name} has GGUF type {t.type}, which is not supported; "
                                                  f"supported: {', '.join(SUPPORTED_TYPES)}")
        if mlx_name(t.name) is None:
            raise ConfigError("model", str(path), f"tensor {t.name} has no place in an mlx-lm {arch} model "
                                                  "(e.g. Llama 3.1's rope_freqs scaling is not supported)")
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError("model", str(path), f"GGUF tokenizer model {model!r} is not supported; supported: gpt2 "
                                              "(byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError("model", str(path), f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                                              f"{', '.join(PRE_TOKENIZERS)}")
    if metadata.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise ConfigError("model", str(path), f"rope scaling {metadata[f'{arch}.rope.scaling.type']!r} is not "
                                              "supported; supported: none, linear")


def mlx_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a tensor with no place."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "scales", "biases"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


# ---------------------------------------------------------------------------------------------------
# Weights, config and tokenizer


def unpermute_rows(w, n_heads: int):
    """Undo llama.cpp's row order for q / k projections (rotary pairs interleaved) into Hugging Face's (halves).

    llama.cpp reorders each head's rows from [first half, second half] to interleaved pairs; this is its
    inverse. Quantization groups run along each row, so packed weights, scales and biases permute alike.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config(metadata: dict, tensors: list[TensorInfo]) -> dict:
    """mlx-lm's config.json for the llama file's hyperparameters (everything but the quantization block)."""
    a = metadata["general.architecture"]
    heads = int(metadata[f"{a}.attention.head_count"])
    hidden = int(metadata[f"{a}.embedding_length"])
    names = {t.name for t in tensors}
    vocab = metadata.get(f"{a}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(metadata[f"{a}.block_count"]),
        "intermediate_size": int(metadata[f"{a}.feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get(f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(metadata.get(f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(metadata[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(metadata.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(metadata.get(f"{a}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if metadata.get(f"{a}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(metadata[f"{a}.rope.scaling.factor"])}
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            config[field] = int(metadata[f"tokenizer.ggml.{key}"])
    return config


def quantization_config(weights: dict) -> dict | None:
    """config.json's quantization block: the commonest bit width, and per-layer entries for the others."""
    group_size = 32  # every GGUF block type read here holds 32 weights
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            layer = name[: -len(".scales")]
            bits[layer] = weights[f"{layer}.weight"].shape[-1] * 32 // (scales.shape[-1] * group_size)
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    block = {"group_size": group_size, "bits": common, "mode": "affine"}
    block.update({layer: {"group_size": group_size, "bits": b, "mode": "affine"}
                  for layer, b in sorted(bits.items()) if b != common})
    return block


def build_tokenizer(metadata: dict):
    """(tokenizers.Tokenizer, tokenizer_config.json dict): byte-level BPE rebuilt from the file's vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":  # digits one by one, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # CONTROL (3) tokens are special; USER_DEFINED (4) ones are matched whole but decoded as text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token")) and bos is not None
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        steps.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                   special_tokens=[(bos, tokens.index(bos))]))
    tok.post_processor = processors.Sequence(steps)
    arch = metadata["general.architecture"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": token("eos"), "unk_token": token("unknown"), "pad_token": token("padding"),
        "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get(f"{arch}.context_length", 2048)),
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tok, config


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write an mlx-lm model folder (config.json, model.safetensors, tokenizer) for a GGUF file, atomically."""
    import mlx.core as mx

    from .adapter import atomic_folder

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ConfigError("model", str(gguf_path), "no such GGUF file")
    metadata, tensors = read_header(gguf_path)
    check_supported(gguf_path, metadata, tensors)  # before any tensor is read
    config = model_config(metadata, tensors)
    q_heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    weights = {}
    for name, w in mx.load(str(gguf_path)).items():
        new = mlx_name(name)
        if ".attn_q." in name:
            w = unpermute_rows(w, q_heads)
        elif ".attn_k." in name:
            w = unpermute_rows(w, kv_heads)
        weights[new] = w
    quantization = quantization_config(weights)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    tokenizer, tokenizer_config = build_tokenizer(metadata)

    def write(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))

    return atomic_folder(Path(out_dir).expanduser(), write)
