"""attach() on every model family mlx-lm ships that ReFT targets: freezing, exact counts, exact no-op, causality, KV-cache decoding."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from loreft import ReftConfig, attach
from loreft.demo import build_tiny_model

D, LAYERS, HEADS = 32, 2, 2
GEMMA3_TEXT = dict(sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=16, num_key_value_heads=1)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
    "gemma": {},
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3_text": GEMMA3_TEXT,
    "gemma3": dict(text_config=dict(model_type="gemma3_text", hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=64,
                                    num_attention_heads=HEADS, head_dim=D // HEADS, **GEMMA3_TEXT)),
    "phi3": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}

# Trainable parameters of one intervention, from the paper's definitions (R and W are r x d, b is r).
PER_INTERVENTION = {
    "loreft": lambda d, r: 2 * r * d + r,
    "noreft": lambda d, r: 2 * r * d + 2 * r,
    "direft": lambda d, r: 2 * r * d + r,
    "nodireft": lambda d, r: 2 * r * d + 2 * r,
    "consreft": lambda d, r: r * d + r,
    "lobireft": lambda d, r: r * d + r,
}


def build(root: Path, family: str, num_layers: int = LAYERS) -> Path:
    """A tiny model folder of this family (config.json names the family, as a real checkpoint does)."""
    return build_tiny_model(root / f"{family}-{num_layers}", model_type=family, hidden_size=D, num_layers=num_layers,
                            num_heads=HEADS, intermediate_size=64, **FAMILIES[family])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build(root, f) for f in FAMILIES}


def tokens(batch: int, length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(10, 200, (batch, length)))


def n_base_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_freezes_base_and_counts_exactly(folders, family):
    model, _ = load(str(folders[family]))
    base_count = n_base_parameters(model)
    reft = attach(model, ReftConfig(layers="all", rank=3, positions="f1+l2"))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all("interventions" in k for k in trainable)
    expected = PER_INTERVENTION["loreft"](D, 3) * LAYERS * 2  # all layers x untied first / last
    assert sum(v.size for v in trainable.values()) == expected
    stats = reft.stats()
    assert stats.trainable == expected and stats.total == base_count
    assert len(reft.interventions()) == LAYERS * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_no_locations_is_the_base_model_and_edit_is_causal(folders, family):
    model, _ = load(str(folders[family]))
    x = tokens(2, 9)
    base = np.array(model(x))
    reft = attach(model, ReftConfig(layers="all", rank=3, positions="l2"))
    reft.set_locations(None)
    np.testing.assert_array_equal(np.array(model(x)), base)

    prompt_lengths = [6, 3]  # the rest of each row is completion
    reft.set_locations(reft.locations(prompt_lengths))
    edited = np.array(model(x))
    for b, n in enumerate(prompt_lengths):
        first = n - 2  # 'l2': the last two prompt tokens
        np.testing.assert_array_equal(edited[b, :first], base[b, :first])  # earlier positions cannot see it
        assert (np.abs(edited[b, first:] - base[b, first:]).max(-1) > 0).all()  # it and every later one do

    reft.set_locations(None)
    np.testing.assert_array_equal(np.array(model(x)), base)  # turning it off restores the base model


def greedy_recompute(model, reft, prompt: mx.array, steps: int):
    """Greedy decode with no cache: the whole sequence each step, edit on the prompt positions."""
    seq, out, logprobs = prompt, [], []
    reft.set_locations(reft.locations([len(prompt)]))
    for _ in range(steps):
        logits = model(seq[None])[0, -1]
        lp = logits - mx.logsumexp(logits)
        tok = mx.argmax(lp)
        out.append(tok.item())
        logprobs.append(np.array(lp))
        seq = mx.concatenate([seq, tok[None]])
    return out, np.stack(logprobs)


def greedy_cached(model, prompt: mx.array, steps: int, prefill_step_size: int):
    cache = make_prompt_cache(model)
    pairs = list(generate_step(prompt, model, max_tokens=steps, prompt_cache=cache, prefill_step_size=prefill_step_size))
    return [int(t) for t, _ in pairs], np.stack([np.array(lp) for _, lp in pairs])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_equals_recomputation(folders, family):
    model, _ = load(str(folders[family]))
    prompt, steps = tokens(1, 9, seed=1)[0], 6
    base_tokens, base_lp = greedy_cached(model, prompt, steps, prefill_step_size=512)
    reft = attach(model, ReftConfig(layers="all", rank=3, positions="f2+l2", intervention="loreft"))
    # The edit must matter for this check to mean anything: make it large.
    reft.load_parameters({k: v * 4 if k.endswith("bias") else v for k, v in reft.parameters().items()})

    want_tokens, want_lp = greedy_recompute(model, reft, prompt, steps)
    assert np.abs(want_lp[0] - base_lp[0]).max() > 1e-2
    # The prompt is prefilled in chunks of 3 (positions 0-2, 3-5, 6-7, then 8): edits land in several chunks.
    for chunk in (3, 512):
        reft.set_locations(reft.locations([len(prompt)]))
        got_tokens, got_lp = greedy_cached(model, prompt, steps, prefill_step_size=chunk)
        assert got_tokens == want_tokens
        np.testing.assert_allclose(got_lp, want_lp, atol=2e-4)

    reft.set_locations(None)
    np.testing.assert_allclose(greedy_cached(model, prompt, steps, 512)[1], base_lp, atol=1e-5)


@pytest.mark.parametrize("kind", list(PER_INTERVENTION))
@pytest.mark.parametrize("tied", [False, True])
def test_stats_for_every_intervention(folders, tmp_path, kind, tied):
    model, _ = load(str(folders["llama"]))
    base_count = n_base_parameters(model)
    reft = attach(model, ReftConfig(layers=[1], rank=4, positions="f3+l3", intervention=kind, share_weights=tied))
    assert reft.groups == (["shared"] if tied else ["first", "last"])
    expected = PER_INTERVENTION[kind](D, 4) * 1 * (1 if tied else 2)
    assert reft.stats().trainable == expected == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert reft.stats().total == base_count
    assert type(model.layers[0]).__name__ != "ReftBlock" and type(model.layers[1]).__name__ == "ReftBlock"


def test_attach_twice_nests_and_freezes_the_first_adapter(folders):
    model, _ = load(str(folders["llama"]))
    first = attach(model, ReftConfig(layers="0", rank=2, positions="l1"))
    second = attach(model, ReftConfig(layers="0;1", rank=2, positions="l1"))  # composition (tests/test_composition.py)
    assert model.layers[0].block is first.blocks[0] and second.blocks[0] is model.layers[0]
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {f"model.layers.{i}.interventions.last.{p}" for i in (0, 1) for p in ("rotation", "weight", "bias")}


def test_dropout_is_off_on_an_eval_model_and_on_in_train_mode(folders):
    x = tokens(1, 8)
    logits = []
    for p in (0.0, 0.5):
        model, _ = load(str(folders["llama"]))  # mlx_lm.load returns a model in eval mode
        reft = attach(model, ReftConfig(layers="all", rank=3, positions="f2+l2", dropout=p, seed=3))
        reft.set_locations(reft.locations([8]))
        logits.append(np.array(model(x)))
    np.testing.assert_array_equal(logits[0], logits[1])  # eval: dropout is the identity
    model.train()
    mx.random.seed(0)
    a, b = np.array(model(x)), np.array(model(x))
    assert not np.array_equal(a, b)  # train: a fresh mask each call


def test_cache_without_offset_is_counted_per_block(tmp_path):
    """A block whose cache keeps no offset (an SSM state): the prompt edit must not repeat at decode steps."""
    import mlx.nn as nn

    from loreft.model import ReftBlock

    path = build_tiny_model(tmp_path / "m", hidden_size=D, num_layers=2, num_heads=HEADS, intermediate_size=64)
    model, _ = load(str(path))
    reft = attach(model, ReftConfig(layers="0", rank=2, positions="l1", seed=1))
    block = model.layers[0]
    assert isinstance(block, ReftBlock)

    class StatefulBlock(nn.Module):  # stands for a recurrent block: output = input, cache keeps no offset
        def __call__(self, x, mask=None, cache=None):
            return x

    class NoOffsetCache:
        pass

    block.block = StatefulBlock()
    x = mx.random.normal((1, 5, D))
    reft.set_locations(reft.locations([5]))
    edited = block(x, None, NoOffsetCache())
    changed = np.abs(np.array(edited - x)).max(axis=-1)[0]
    assert changed[4] > 1e-4 and (changed[:4] == 0).all()  # only the last prompt token
    step = mx.random.normal((1, 1, D))
    assert mx.array_equal(block(step, None, NoOffsetCache()), step)  # decode step: position 5, no edit
    reft.set_locations(reft.locations([5]))  # a new prompt counts from 0 again
    assert mx.array_equal(block(x, None, NoOffsetCache()), edited)
