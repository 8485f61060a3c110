"""GGUF import: a tiny llama written the way llama.cpp writes it converts back exactly; the real SmolLM2 file
converts with its quantization kept, its rotary layout undone and its tokenizer rebuilt; unsupported files fail
with one line before any tensor is read."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.utils import dequantize_model

import loreft.gguf as G
from loreft import cli
from loreft.config import ConfigError

# llama.cpp's names for mlx-lm's llama tensors, written out here independently of loreft.gguf
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q / k rows: each head's two halves become interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir, path) -> None:
    """The tiny test llama as llama.cpp would write it: F16 matrices, F32 norms, permuted q / k, BPE metadata."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab = {**tok["model"]["vocab"], **specials}
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    tensors = {}
    for name, w in mx.load(str(model_dir / "model.safetensors")).items():
        w = np.array(w)
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        else:
            _, _, i, *rest = name.split(".")
            key = f"blk.{i}.{LLAMA_CPP_NAMES['.'.join(rest[:-1])]}.weight"
            if "q_proj" in name:
                w = llama_cpp_permute(w, config["num_attention_heads"])
            elif "k_proj" in name:
                w = llama_cpp_permute(w, config["num_key_value_heads"])
        tensors[key] = mx.array(w.astype(np.float32 if w.ndim == 1 else np.float16))
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    metadata = {
        "general.architecture": "llama", "llama.embedding_length": u32(config["hidden_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]), "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]],
        "tokenizer.ggml.token_type": mx.array([3 if t in specials else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(config["bos_token_id"]), "tokenizer.ggml.eos_token_id": u32(config["eos_token_id"]),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    mx.save_gguf(str(path), tensors, metadata)


def write_gguf_header(path, metadata: dict[str, str], tensors: list[tuple[str, tuple, int]]) -> None:
    """A GGUF v3 header with string metadata and tensor entries (no tensor data: nothing past the header is read)."""
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        out += [s(key), struct.pack("<I", 8), s(value)]
    for name, dims, kind in tensors:
        out += [s(name), struct.pack("<I", len(dims)), *(struct.pack("<Q", d) for d in dims), struct.pack("<IQ", kind, 0)]
    path.write_bytes(b"".join(out))


# ---------------------------------------------------------------------------------------------------
# A tiny F16 llama, written the llama.cpp way


def test_tiny_f16_gguf_converts_back_to_the_same_model(tiny_model_dir, tmp_path):
    write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    out = G.convert(tmp_path / "tiny.gguf", tmp_path / "converted")
    assert "quantization" not in json.loads((out / "config.json").read_text())  # F16 / F32 only: dense
    model, tok = mlx_lm.load(str(out))
    ref, ref_tok = mlx_lm.load(str(tiny_model_dir))
    ref.update(tree_map(lambda x: x.astype(mx.float16) if x.ndim == 2 else x, ref.parameters()))  # F16 matrices
    text = "Who are you? 🤖 The quick brown fox, 2 plus 2."
    ids = tok.encode(text)
    assert ids == ref_tok.encode(text)  # the rebuilt BPE tokenizes exactly as the original
    assert tok.decode(ids) == text
    logits, expected = model(mx.array([ids])), ref(mx.array([ids]))
    assert mx.allclose(logits.astype(mx.float32), expected.astype(mx.float32), atol=1e-2, rtol=1e-2)
    assert mx.array_equal(logits.argmax(-1), expected.argmax(-1))


# ---------------------------------------------------------------------------------------------------
# One-line errors for what the importer cannot convert


@pytest.mark.parametrize("metadata, tensors, named", [
    ({"general.architecture": "qwen2"}, [], "'qwen2'"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"}, [("blk.0.ffn_down.weight", (64, 128), 14)],
     "blk.0.ffn_down.weight has GGUF type Q6_K"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"}, [("rope_freqs.weight", (32,), 0)], "rope_freqs"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "llama"}, [("output_norm.weight", (64,), 0)], "'llama'"),
    ({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"},
     [("output_norm.weight", (64,), 0)], "pre-tokenizer 'qwen2'"),
])
def test_unsupported_files_fail_with_one_line(metadata, tensors, named, tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.gguf"
    write_gguf_header(path, metadata, tensors)
    monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("read tensors before checking the file"))
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and str(path) in err[0]
    assert not (tmp_path / "out").exists()
    # the same check runs when a training job is validated, before data or model load
    assert cli.main(["train", "--model", str(path), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert named in capsys.readouterr().err


def test_arch_check_reads_a_file_written_by_mlx(tmp_path):
    path = tmp_path / "other.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "qwen2"})
    with pytest.raises(ConfigError, match="architecture 'qwen2' is not supported"):
        G.convert(path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        G.read_header(path)


# ---------------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1


def test_header_reader_agrees_with_mlx(smollm2_gguf):
    metadata, tensors = G.read_header(smollm2_gguf)
    weights, mlx_metadata = mx.load(str(smollm2_gguf), return_metadata=True)
    as_python = {k: (v.tolist() if isinstance(v, mx.array) else v) for k, v in mlx_metadata.items()}
    assert metadata.keys() == as_python.keys()
    for key, value in as_python.items():
        assert metadata[key] == pytest.approx(value) if isinstance(value, float) else metadata[key] == value, key
    assert {t.name for t in tensors} == {k for k in weights if not k.endswith((".scales", ".biases"))}
    for t in tensors:
        if t.type == "F32":
            assert t.shape == tuple(weights[t.name].shape)
        else:  # quantized: mx.load packs 32 / bits values into each uint32
            bits = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}[t.type]
            assert t.shape[:-1] + (t.shape[-1] * bits // 32,) == tuple(weights[t.name].shape)


def test_real_file_converts_keeping_its_quantization(smollm2_gguf, smollm2_dir):
    metadata, _ = G.read_header(smollm2_gguf)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings")} == {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True}
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    raw = mx.load(str(smollm2_gguf))
    saved = mx.load(str(smollm2_dir / "model.safetensors"))
    assert len(saved) == len(raw)
    # packed weights are stored as they are in the file (not unpacked)
    for gguf_name, name in [("blk.7.ffn_down", "model.layers.7.mlp.down_proj"), ("token_embd", "model.embed_tokens")]:
        for part in ("weight", "scales", "biases"):
            assert saved[f"{name}.{part}"].dtype == raw[f"{gguf_name}.{part}"].dtype
            assert mx.array_equal(saved[f"{name}.{part}"], raw[f"{gguf_name}.{part}"])
    # q / k rows are reordered, never changed: each head's rows are the file's, in Hugging Face's order
    q = np.array(saved["model.layers.0.self_attn.q_proj.weight"])
    assert np.array_equal(llama_cpp_permute(q, 9), np.array(raw["blk.0.attn_q.weight"]))
    k = np.array(saved["model.layers.0.self_attn.k_proj.scales"])
    assert np.array_equal(llama_cpp_permute(k, 3), np.array(raw["blk.0.attn_k.scales"]))
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == metadata["tokenizer.chat_template"]
    assert (tok_config["eos_token"], tok_config["bos_token"]) == ("<|im_end|>", "<|im_start|>")


def test_unpermuted_model_equals_the_files_layout_with_traditional_rope(smollm2_gguf, smollm2_dir, tmp_path):
    """mlx-lm's llama with rope_traditional on the file's own row order is the model llama.cpp runs."""
    raw_dir = tmp_path / "raw-layout"
    raw_dir.mkdir()
    weights = {G.mlx_name(k): v for k, v in mx.load(str(smollm2_gguf)).items()}  # renamed, rows untouched
    mx.save_safetensors(str(raw_dir / "model.safetensors"), weights)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (raw_dir / name).write_bytes((smollm2_dir / name).read_bytes())
    ours, tok = mlx_lm.load(str(smollm2_dir))
    reference, _ = mlx_lm.load(str(raw_dir), model_config={"rope_traditional": True})
    for model in (ours, reference):  # the same numbers, in float32 dense matmuls (fast on a CPU)
        model.set_dtype(mx.float32)
        dequantize_model(model)
    ids = mx.array([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    a, b = ours(ids), reference(ids)
    assert mx.allclose(a, b, atol=1e-3, rtol=1e-3)
    assert mx.array_equal(a.argmax(-1), b.argmax(-1))


def test_real_tokenizer(smollm2_dir):
    from mlx_lm.tokenizer_utils import load

    tok = load(smollm2_dir)
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1 and tok.encode("<|im_end|>") == [2]  # special, whole
    assert tok.eos_token_ids == {2}
    assert len(tok.encode("2026")) == 4  # SmolLM's pre-tokenizer splits digits one by one
    text = "Héllo wörld! 🤖 Ünïcode, tabs\tand\nnewlines."
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
