"""grad_checkpoint: the blocks' activations are recomputed in the backward pass, with the same gradients.

Same loss and gradients as keeping the activations (through the trainer's compiled step, one Adam update
compared), and a lower peak memory for a long sequence, which would not drop if nothing were recomputed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten

from loreft import ReftConfig, TrainConfig, attach
from loreft.demo import build_tiny_model
from loreft.loss import completion_loss
from loreft.trainer import make_optimizer, make_step

REFT = ReftConfig(layers="all", rank=3, positions="f2+l2", seed=1)


def loss_and_grads(model_dir, recompute: bool, T: int = 40):
    model, _ = mlx_lm.load(str(model_dir))
    reft = attach(model, REFT)
    model.train()
    reft.recompute_blocks(recompute)
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(4, model.args.vocab_size, (2, T)).astype(np.int32))
    mask = mx.array((np.arange(T - 1)[None, :] >= np.array([[9], [13]])).astype(np.float32))
    reft.set_locations(reft.locations([10, 14]))
    loss, grads = nn.value_and_grad(model, lambda m: completion_loss(m, tokens, mask)[0])(model)
    mx.eval(loss, grads)
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def test_same_loss_and_gradients(tiny_model_dir):
    loss_kept, kept = loss_and_grads(tiny_model_dir, False)
    loss_recomputed, recomputed = loss_and_grads(tiny_model_dir, True)
    assert loss_recomputed == loss_kept
    assert kept.keys() == recomputed.keys() and len(kept) > 0
    for k in kept:
        np.testing.assert_allclose(recomputed[k], kept[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_trainer_step_same_update_and_less_memory(tmp_path):
    """The compiled training step with grad_checkpoint makes the same update, keeping less memory at its peak."""
    model_dir = build_tiny_model(tmp_path / "m", hidden_size=64, intermediate_size=512, num_layers=4)
    T, B = 513, 4
    rng = np.random.default_rng(0)
    tokens, mask = rng.integers(4, 300, (B, T)).astype(np.int32), np.ones((B, T - 1), np.float32)
    results = {}
    for on in (False, True):
        model, _ = mlx_lm.load(str(model_dir))
        reft = attach(model, REFT)
        model.train()
        cfg = TrainConfig(learning_rate=1e-2, grad_checkpoint=on)
        opt = make_optimizer(cfg, 10)
        opt.init(model.trainable_parameters())
        step, state = make_step(reft, opt, cfg)
        locs = reft.locations([T // 2] * B).as_arrays()
        mx.eval(state)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        loss, *_ = step([(mx.array(tokens), mx.array(mask), locs, None, mx.array(tokens.size))], None, True)
        mx.eval(state, loss)
        results[on] = (loss.item(), {k: np.array(v) for k, v in reft.parameters().items()},
                       mx.get_peak_memory() - before)
    (loss_off, w_off, peak_off), (loss_on, w_on, peak_on) = results[False], results[True]
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    for k in w_off:
        np.testing.assert_allclose(w_on[k], w_off[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert peak_on < 0.8 * peak_off, (peak_on, peak_off)
