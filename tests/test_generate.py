"""Generation with an adapter: KV-cache decoding equals recomputation, batches equal single prompts, formatting."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest

from loreft import ReftConfig, attach
from loreft.config import ConfigError
from loreft.data import Formatter, tokenize_rows
from loreft.demo import DEMO_PROMPT_TEMPLATE
from loreft.generate import (
    batch_generate,
    encode_prompt,
    format_prompt,
    generate,
    stream_generate,
    stream_responses,
    template_variables,
)

LONG = "Representation finetuning edits hidden states in a low-rank subspace. " * 4
PROMPTS = ["Who are you?", "What is two plus two? The quick brown fox", "Hi", LONG]


def _randomize(reft, scale=0.5, seed=1):
    """Non-trivial intervention weights, so the edit visibly changes what the model says."""
    mx.random.seed(seed)
    reft.load_parameters({k: scale * mx.random.normal(v.shape) for k, v in reft.parameters().items()})


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def adapted(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    reft = attach(model, ReftConfig(layers="all", rank=4, positions="f3+l3"))
    _randomize(reft)
    return model, tok, reft


def _greedy_recompute(model, tok, reft, ids, n):
    """Reference: run the whole sequence every step (no KV cache), editing the prompt positions each time."""
    seq, eos = list(ids), set(tok.eos_token_ids)
    for _ in range(n):
        if reft is not None:
            reft.set_locations(reft.locations([len(ids)]))
        try:
            nxt = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
        finally:
            if reft is not None:
                reft.set_locations(None)
        if nxt in eos:
            break
        seq.append(nxt)
    return seq[len(ids):]


def _tokens(model, tok, ids, reft, n, **kw):
    return [r.token for r in stream_responses(model, tok, ids, reft, max_tokens=n, **kw) if r.finish_reason != "stop"]


def test_kv_cache_generation_equals_recomputation_including_chunked_prefill(adapted):
    model, tok, reft = adapted
    for text in PROMPTS:
        ids = encode_prompt(tok, text)
        expected = _greedy_recompute(model, tok, reft, ids, 12)
        assert _tokens(model, tok, ids, reft, 12) == expected, text
        # mlx-lm prefills in chunks: the wrapper must shift positions by the cache offset
        assert _tokens(model, tok, ids, reft, 12, prefill_step_size=5) == expected, text
    assert len(encode_prompt(tok, LONG)) > 3 * 5  # the long prompt really spans several chunks


def test_adapter_changes_the_output_and_base_generation_is_mlx_lm(adapted, plain):
    model, tok, reft = adapted
    base_model, base_tok = plain
    changed = 0
    for text in PROMPTS:
        ids = encode_prompt(tok, text)
        ours_base = generate(base_model, base_tok, ids, None, max_tokens=12)
        assert ours_base == mlx_lm.generate(base_model, base_tok, ids, max_tokens=12)
        # attached but switched off (reft=None / edit=False): exactly the base model
        assert generate(model, tok, ids, None, max_tokens=12) == ours_base
        assert batch_generate(model, tok, [ids], reft, max_tokens=12, edit=False) == [_tokens(base_model, base_tok, ids, None, 12)]
        changed += generate(model, tok, ids, reft, max_tokens=12) != ours_base
    assert changed >= len(PROMPTS) - 1  # the edit is not a no-op
    # a text prompt is tokenized as mlx-lm tokenizes it
    assert generate(base_model, base_tok, "Who are you?", max_tokens=8) == mlx_lm.generate(
        base_model, base_tok, "Who are you?", max_tokens=8
    )


def test_batched_greedy_equals_one_at_a_time(adapted):
    model, tok, reft = adapted
    prompts = [encode_prompt(tok, t) for t in PROMPTS] + [[encode_prompt(tok, "Hi")[0]]]  # incl. a 1-token prompt
    limits = [12, 7, 12, 9, 5]
    singles = [_tokens(model, tok, p, reft, n) for p, n in zip(prompts, limits)]
    assert batch_generate(model, tok, prompts, reft, max_tokens=limits) == singles
    assert batch_generate(model, tok, prompts, reft, max_tokens=limits, prefill_step_size=4) == singles
    assert batch_generate(model, tok, prompts[::-1], reft, max_tokens=limits[::-1]) == singles[::-1]
    assert reft._context.locations is None


def test_stream_pieces_join_to_generate_and_state_is_restored(adapted):
    model, tok, reft = adapted
    pieces = list(stream_generate(model, tok, "Who are you?", reft, max_tokens=10))
    assert len(pieces) > 1 and "".join(pieces) == generate(model, tok, "Who are you?", reft, max_tokens=10)
    model.train()
    try:
        stream = stream_generate(model, tok, "Who are you?", reft, max_tokens=10)
        next(stream)
        assert reft._context.locations is not None and not model.training  # editing, dropout off
        stream.close()  # abandoned early: locations cleared, training mode restored
        assert reft._context.locations is None and model.training
    finally:
        model.eval()


def test_sampling_is_seeded(adapted):
    model, tok, reft = adapted
    a = generate(model, tok, "Who are you?", reft, max_tokens=16, temp=1.5, seed=3)
    assert a == generate(model, tok, "Who are you?", reft, max_tokens=16, temp=1.5, seed=3)
    others = {generate(model, tok, "Who are you?", reft, max_tokens=16, temp=1.5, seed=s) for s in range(4, 8)}
    assert others != {a}


@pytest.mark.parametrize("kw, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temp": -1.0}, "temp"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_arguments_fail_early(adapted, kw, field):
    model, tok, reft = adapted
    with pytest.raises(ConfigError, match=field):
        stream_generate(model, tok, "Hi", reft, **kw)  # raised before the first token is asked for


def test_empty_prompt_is_rejected(adapted):
    model, tok, reft = adapted
    with pytest.raises(ConfigError, match="prompt"):
        generate(model, tok, [], reft)


def test_format_prompt_matches_training_formatting(tiny_tokenizer):
    tok = tiny_tokenizer
    alpaca = Formatter(tok)  # auto-detects instruction / output columns -> Alpaca template
    alpaca.check(["instruction", "input", "output"])
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    expected = alpaca(row)[0]
    assert format_prompt(tok, "Name a colour.", {"prompt_template": alpaca.prompt_template, "chat": False}) == expected
    assert "Name a colour." in expected and "### Input" not in expected

    demo = format_prompt(tok, "Who are you?", {"prompt_template": DEMO_PROMPT_TEMPLATE, "chat": False})
    assert demo == "<|user|>Who are you?<|end|>\n<|assistant|>"

    chat = Formatter(tok, chat_column="messages")
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bot."}]
    chat_prompt = chat({"messages": messages})[0]
    assert format_prompt(tok, "Who are you?", {"prompt_template": None, "chat": True}) == chat_prompt
    assert format_prompt(tok, "Who are you?", {"prompt_template": "Q: {{ q }}", "chat": True}) == chat_prompt
    assert format_prompt(tok, "raw text", None) == "raw text"

    # generation tokenizes the prompt exactly as training did
    examples, _ = tokenize_rows([{"messages": messages}], chat, tok, 256)
    assert encode_prompt(tok, chat_prompt) == examples[0].prompt


def test_template_variable_choice():
    assert template_variables("{{ b }} {% if a %}{{ a }}{% endif %} {{ b }}") == ["b", "a"]
    assert template_variables("{% for x in items %}{{ x }}{% endfor %}") == ["items"]
    assert format_prompt(None, "hi", {"prompt_template": "Q: {{ question }}\nA:"}) == "Q: hi\nA:"
    assert format_prompt(None, "hi", {"prompt_template": "{{ context }} | {{ prompt }}"}) == " | hi"
    with pytest.raises(ConfigError, match="prompt_template"):
        format_prompt(None, "hi", {"prompt_template": "no variables"})
    with pytest.raises(ConfigError, match="prompt_template"):
        format_prompt(None, "hi", {"prompt_template": "{{ broken"})
    with pytest.raises(ConfigError, match="chat"):
        format_prompt(None, "hi", {"chat": "yes"})
