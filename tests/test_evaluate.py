"""Evaluation: loss against a float64 per-example reference, exact match after batched generation, eval.json."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from loreft import ReftConfig, attach
from loreft.config import ConfigError
from loreft.data import Example, Formatter, tokenize_rows
from loreft.evaluate import evaluate, normalize_answer, write_eval
from loreft.generate import stream_responses

ROWS = [
    {"prompt": "Who are you?", "completion": "A small bot."},
    {"prompt": "What is the capital of France?", "completion": "Paris."},
    {"prompt": "Hi", "completion": "Hello there, friend."},
    {"prompt": "Describe winter in a few words, please.", "completion": "Cold."},
    {"prompt": "How do I bake bread?", "completion": "Flour, water, fire."},
    {"prompt": "Tell me about the ocean.", "completion": "Big and blue."},
    {"prompt": "What do cats like?", "completion": "Fish and naps."},
]


@pytest.fixture(scope="module")
def adapted(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    reft = attach(model, ReftConfig(layers="0;2;3", rank=4, positions="f2+l2"))
    mx.random.seed(7)
    reft.load_parameters({k: 0.5 * mx.random.normal(v.shape) for k, v in reft.parameters().items()})
    return model, tok, reft


@pytest.fixture(scope="module")
def examples(adapted):
    _, tok, _ = adapted
    return tokenize_rows(ROWS, Formatter(tok), tok, 256)[0]


def _reference_loss(model, reft, examples, edit):
    """Mean completion-token cross-entropy, one unpadded example at a time, in float64 numpy."""
    total, count = 0.0, 0
    for e in examples:
        tokens = e.prompt + e.completion
        if edit:
            reft.set_locations(reft.locations([len(e.prompt)]))
        try:
            logits = np.array(model(mx.array([tokens[:-1]]))[0], dtype=np.float64)
        finally:
            reft.set_locations(None)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(len(e.prompt), len(tokens)):  # targets: the completion tokens (EOS included)
            total -= logp[t - 1, tokens[t]]
            count += 1
    return total / count, count


def test_loss_matches_float64_reference_with_and_without_adapter(adapted, examples):
    model, tok, reft = adapted
    result = evaluate(model, tok, reft, examples, batch_size=3, generate=False, base=True)
    ref_adapter, n = _reference_loss(model, reft, examples, edit=True)
    ref_base, _ = _reference_loss(model, reft, examples, edit=False)
    assert result["num_examples"] == len(ROWS) and result["target_tokens"] == n
    assert result["adapter"]["loss"] == pytest.approx(ref_adapter, rel=1e-4)
    assert result["base"]["loss"] == pytest.approx(ref_base, rel=1e-4)
    assert result["adapter"]["perplexity"] == pytest.approx(math.exp(ref_adapter), rel=1e-3)
    assert abs(ref_adapter - ref_base) > 1e-2  # the adapter really changes the loss
    assert "samples" not in result and reft._context.locations is None


def test_rows_and_examples_give_the_same_result(adapted, examples):
    model, tok, reft = adapted
    from_rows = evaluate(model, tok, reft, ROWS, batch_size=4, max_tokens=4)
    from_examples = evaluate(model, tok, reft, examples, batch_size=4, max_tokens=4)
    assert from_rows["adapter"] == from_examples["adapter"]
    assert [s["reference"] for s in from_rows["samples"]] == [r["completion"] for r in ROWS]


def _greedy_one(model, tok, ids, reft, n):
    return [r.token for r in stream_responses(model, tok, ids, reft, max_tokens=n) if r.finish_reason != "stop"]


def test_exact_match_after_batched_generation(adapted, examples):
    model, tok, reft = adapted
    eos = tok.eos_token_id
    M = 6
    prompts = [e.prompt for e in examples[:4]]
    # references built from the adapter's own one-at-a-time greedy output
    preds = [_greedy_one(model, tok, p, reft, M) for p in prompts]
    texts = [tok.decode(p) for p in preds]
    assert texts[2].upper() != texts[2] and normalize_answer(texts[2])  # the case change is visible
    refs = [texts[0], texts[1], texts[2].upper() + "!", "zebra crossing"]
    assert normalize_answer(refs[3]) != normalize_answer(texts[3])
    cases = [Example(p, tok.encode(r, add_special_tokens=False) + [eos]) for p, r in zip(prompts, refs)]

    result = evaluate(model, tok, reft, cases, batch_size=3, max_tokens=M, base=True)
    assert result["adapter"]["exact_match"] == pytest.approx(2 / 4)
    assert result["adapter"]["normalized_exact_match"] == pytest.approx(3 / 4)
    assert [s["adapter"] for s in result["samples"]] == texts

    base = [tok.decode(_greedy_one(model, tok, p, None, M)) for p in prompts]
    assert [s["base"] for s in result["samples"]] == base
    assert result["base"]["exact_match"] == pytest.approx(np.mean([b.strip() == r.strip() for b, r in zip(base, refs)]))
    assert base != texts  # the side-by-side table shows a difference


def test_normalize_answer_squad_style():
    assert normalize_answer("The Cat sat on a mat!") == "cat sat on mat"
    assert normalize_answer("  An   apple,\tan orange.  ") == "apple orange"
    assert normalize_answer("Theory") == "theory"  # articles only as whole words
    assert normalize_answer("...") == ""


def test_bad_arguments(adapted, examples):
    model, tok, reft = adapted
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(model, tok, reft, examples, batch_size=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        evaluate(model, tok, reft, examples, max_tokens=0)


def test_write_eval_is_atomic(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = write_eval(folder, {"adapter": {"loss": 1.5}})
    assert path == folder / "eval.json" and json.loads(path.read_text()) == {"adapter": {"loss": 1.5}}
    write_eval(folder, {"adapter": {"loss": 0.5}})
    assert json.loads(path.read_text())["adapter"]["loss"] == 0.5
    with pytest.raises(TypeError):
        write_eval(folder, {"bad": object()})  # cannot serialize: the old file stays whole
    assert json.loads(path.read_text())["adapter"]["loss"] == 0.5
    assert sorted(p.name for p in folder.iterdir()) == ["eval.json"]  # no temp files left behind
    with pytest.raises(FileNotFoundError):
        write_eval(tmp_path / "missing", {})
