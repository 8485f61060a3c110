"""Several adapters on one base model at once (pyreft's composition), through ReftStack."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from loreft import ReftConfig, attach, load_adapter, save_adapter
from loreft.generate import batch_generate, generate
from loreft.model import ReftStack


def perturbed(reft, seed):
    """Give the adapter non-trivial weights (a fresh LoReFT edit starts small but not zero)."""
    rng = np.random.default_rng(seed)
    reft.load_parameters({k: mx.array(np.asarray(v) + rng.normal(0, 0.3, v.shape).astype(np.float32))
                          for k, v in reft.parameters().items()})


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters trained apart: A edits layer 1, B edits layer 2, both at the last prompt token."""
    out = tmp_path_factory.mktemp("adapters")
    for name, layer, seed in (("a", "1", 1), ("b", "2", 2)):
        model, _ = mlx_lm.load(str(tiny_model_dir))
        reft = attach(model, ReftConfig(layers=layer, rank=2, positions="l1", seed=seed))
        perturbed(reft, seed)
        save_adapter(reft, out / name)
    return out / "a", out / "b"


def test_stack_equals_one_adapter_holding_both_layers(tiny_model_dir, adapters):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    stack = ReftStack([load_adapter(model, adapters[0]), load_adapter(model, adapters[1])])
    # the same edit as a single adapter over layers 1 and 2 carrying A's and B's weights
    joint_model, _ = mlx_lm.load(str(tiny_model_dir))
    joint = attach(joint_model, ReftConfig(layers="1;2", rank=2, positions="l1"))
    weights = {**mx.load(str(adapters[0] / "adapter.safetensors")), **mx.load(str(adapters[1] / "adapter.safetensors"))}
    joint.load_parameters(weights)
    ids = tok.encode("What do cats like?")
    x = mx.array([ids])
    stack.set_locations(stack.locations([len(ids)]))
    joint.set_locations(joint.locations([len(ids)]))
    assert np.array_equal(np.array(model(x)), np.array(joint_model(x)))
    # and each adapter alone gives something else
    stack.refts[1].set_locations(None)
    assert not np.allclose(np.array(model(x)), np.array(joint_model(x)), atol=1e-4)
    stack.set_locations(None)


def test_same_layer_adapters_apply_one_after_the_other(tiny_model_dir, tmp_path):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    first = attach(model, ReftConfig(layers="1", rank=2, positions="l1", seed=3))
    second = attach(model, ReftConfig(layers="1", rank=2, positions="l1", seed=4))  # its own subspace
    perturbed(first, 3), perturbed(second, 4)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {f"model.layers.1.interventions.last.{p}" for p in ("rotation", "weight", "bias")}  # newest only
    assert first.stats().total == second.stats().total  # the base count leaves every adapter out
    stack = ReftStack([first, second])
    h = mx.random.normal((1, 4, 64))
    inner = first.blocks[1]
    # what the stacked block does at the edited position: second's intervention on first's output
    outer = second.blocks[1]
    assert outer.block is inner
    stack.set_locations(stack.locations([4]))
    got = np.array(outer(h))
    ref_first = np.array(first.interventions()["layers.1.last"](inner.block(h)[:, 3:4]))
    ref_both = np.array(second.interventions()["layers.1.last"](mx.array(ref_first)))
    np.testing.assert_allclose(got[:, 3:4], ref_both, atol=1e-5)
    np.testing.assert_array_equal(got[:, :3], np.array(inner.block(h))[:, :3])
    stack.set_locations(None)


def test_stack_generates_batched_like_one_by_one(tiny_model_dir, adapters):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    stack = ReftStack([load_adapter(model, adapters[0]), load_adapter(model, adapters[1])])
    prompts = ["Who are you?", "Describe winter.", "Hi"]
    one_by_one = [tok.encode(generate(model, tok, p, stack, max_tokens=6)) for p in prompts]
    batched = batch_generate(model, tok, prompts, stack, max_tokens=6)
    assert [tok.decode(b) for b in batched] == [tok.decode(o) for o in one_by_one]
    alone = [generate(model, tok, p, stack.refts[0], max_tokens=6) for p in prompts]
    assert alone != [tok.decode(b) for b in batched]
