"""Settings whose effect on training is checked here: dropout, grad_clip, weight_decay, max_eval_batches, a resume
from the middle of an epoch, and checkpoints that belong to another run."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from loreft import ReftConfig, TrainConfig, attach
from loreft.config import ConfigError
from loreft.reporting import Callback
from loreft.trainer import NonFiniteLossError, train

REFT = dict(layers="1;2", rank=2, positions="f1+l1", seed=0)


def fresh(tiny_model_dir, **kw):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    return attach(model, ReftConfig(**{**REFT, **kw}))


def cfg(**kw):
    base = dict(learning_rate=1e-2, batch_size=4, epochs=2, steps_per_report=1, steps_per_eval=0, warmup_ratio=0.0,
                lr_schedule="constant", seed=0)
    return TrainConfig(**{**base, **kw})


def weights(folder) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapter.safetensors")).items()}


def first_loss(folder) -> float:
    return next(json.loads(l)["loss"] for l in (folder / "metrics.jsonl").read_text().splitlines())


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_dropout_acts_in_training_and_is_reproducible_by_seed(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    for name, dropout, seed in (("off", 0.0, 0), ("a", 0.3, 0), ("b", 0.3, 0), ("c", 0.3, 1)):
        reft = fresh(tiny_model_dir, dropout=dropout)  # the same initial weights in every run (ReftConfig seed 0)
        train(reft, ex, None, cfg(seed=seed), tmp_path / name, pad_id=pad)
    # the very first loss is computed before any update, from identical weights and batch: only dropout differs
    assert first_loss(tmp_path / "a") != first_loss(tmp_path / "off")
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "off")) > 1e-4
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) == 0.0  # same seed: the same masks
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "c")) > 1e-4


def test_grad_clip(tiny_model_dir, examples, tmp_path):
    import mlx.optimizers as optim

    ex, pad = examples
    eps = optim.Adam(learning_rate=1.0).eps
    lr, bound = 100.0, 1e-3 * eps  # clipped far below Adam's epsilon, the first update is linear in the gradient
    initial = {k: np.array(v) for k, v in fresh(tiny_model_dir).parameters().items()}
    runs = {"off": 0.0, "loose": 1e9, "tight": bound, "twice": 2 * bound}
    for name, clip in runs.items():
        train(fresh(tiny_model_dir), ex, None, cfg(iters=1, learning_rate=lr, grad_clip=clip), tmp_path / name, pad_id=pad)
    step = {name: {k: v - initial[k] for k, v in weights(tmp_path / name).items()} for name in runs}
    norm = lambda d: float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in d.values())))  # noqa: E731
    assert max_diff(step["loose"], step["off"]) == 0.0  # a bound above the gradient's norm changes nothing
    # Adam's first update is lr * g / (|g| + eps) per element: about lr * sign(g) unclipped, but with the
    # gradient scaled to global norm c << eps it is lr * g / eps, of global norm lr * c / eps, linear in c
    assert norm(step["tight"]) == pytest.approx(lr * bound / eps, rel=1e-2)
    for k in initial:
        assert np.allclose(step["twice"][k], 2 * step["tight"][k], rtol=1e-2, atol=1e-6), k
    assert norm(step["off"]) > 100 * norm(step["tight"])


def test_weight_decay_is_decoupled_adamw(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    lr, wd = 1e-2, 0.5
    initial = {k: np.array(v) for k, v in fresh(tiny_model_dir).parameters().items()}
    train(fresh(tiny_model_dir), ex, None, cfg(iters=1, learning_rate=lr), tmp_path / "adam", pad_id=pad)
    train(fresh(tiny_model_dir), ex, None, cfg(iters=1, learning_rate=lr, weight_decay=wd), tmp_path / "adamw", pad_id=pad)
    adam, adamw = weights(tmp_path / "adam"), weights(tmp_path / "adamw")
    # AdamW (Loshchilov & Hutter): w1 = w0 - lr * wd * w0 - lr * adam_step, so the two runs differ by lr * wd * w0
    for k in initial:
        assert np.allclose(adamw[k] - adam[k], -lr * wd * initial[k], atol=1e-6), k
    assert max(np.abs(lr * wd * v).max() for v in initial.values()) > 1e-3  # a difference worth checking


@pytest.mark.parametrize("cap", [1, 2, 0])
def test_max_eval_batches_caps_validation(tiny_model_dir, examples, tmp_path, cap):
    ex, pad = examples
    valid = ex[:7]
    summary = train(fresh(tiny_model_dir), ex, valid, cfg(iters=2, batch_size=2, max_eval_batches=cap),
                    tmp_path / "a", pad_id=pad)
    # validation batches are the examples sorted by length (stable), two at a time; targets are completion tokens
    order = sorted(range(len(valid)), key=lambda i: valid[i].length)
    batches = [order[i:i + 2] for i in range(0, len(order), 2)]
    used = batches[:cap] if cap else batches
    assert summary["valid"]["tokens"] == sum(len(valid[i].completion) for b in used for i in b)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_the_middle_of_an_epoch_equals_an_uninterrupted_run(tiny_model_dir, examples, tmp_path, accumulate, stop_after):
    ex, pad = examples  # 10 examples in batches of 4: 3 steps an epoch, so step 4 is one batch into epoch 2
    config = cfg(epochs=3, save_every=4, grad_accumulation_steps=accumulate, lr_schedule="cosine", warmup_ratio=0.2)
    full = train(fresh(tiny_model_dir, dropout=0.2), ex, None, config, tmp_path / "full", pad_id=pad)

    part = train(fresh(tiny_model_dir, dropout=0.2), ex, None, config, tmp_path / "run", pad_id=pad, callbacks=[stop_after(5)])
    assert part["stopped"] and part["steps"] == 5
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert 4 % 3 != 0 and checkpoint.is_dir()
    resumed = train(fresh(tiny_model_dir, dropout=0.2), ex, None, config, tmp_path / "run", pad_id=pad, resume_from=checkpoint)
    assert resumed["steps"] == full["steps"] == 9
    assert max_diff(weights(tmp_path / "run"), weights(tmp_path / "full")) < 1e-5
    losses = lambda f: [json.loads(l)["loss"] for l in (f / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert np.allclose(losses(tmp_path / "run"), losses(tmp_path / "full"), atol=1e-5)


def test_a_fresh_run_never_keeps_another_runs_checkpoints(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    folder = tmp_path / "a"
    train(fresh(tiny_model_dir), ex, None, cfg(epochs=3, save_every=2), folder, pad_id=pad)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-0000002", "step-0000004", "step-0000006",
                                                                         "step-0000008"]
    train(fresh(tiny_model_dir), ex, None, cfg(iters=3, save_every=0), folder, pad_id=pad)  # fresh, no checkpoints
    assert not (folder / "checkpoints").exists()
    train(fresh(tiny_model_dir), ex, None, cfg(epochs=3, save_every=2), folder, pad_id=pad)
    train(fresh(tiny_model_dir), ex, None, cfg(iters=5, save_every=3), folder, pad_id=pad)  # fresh, its own checkpoints
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-0000003"]


def test_non_finite_loss_never_names_another_runs_checkpoint(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    folder = tmp_path / "a"
    train(fresh(tiny_model_dir), ex, None, cfg(epochs=3, save_every=2), folder, pad_id=pad)
    reft = fresh(tiny_model_dir)

    class Poison(Callback):
        def on_step(self, step, total):
            if step == 1:
                iv = next(iter(reft.interventions().values()))
                iv.weight = mx.full(iv.weight.shape, float("nan"))

    with pytest.raises(NonFiniteLossError, match="no checkpoint had been saved yet") as e:
        train(reft, ex, None, cfg(epochs=3, save_every=2), folder, pad_id=pad, callbacks=[Poison()])
    assert "step-" not in str(e.value)


def test_resuming_a_checkpoint_past_this_runs_end_is_refused(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    folder = tmp_path / "a"
    train(fresh(tiny_model_dir), ex, None, cfg(epochs=3, save_every=2), folder, pad_id=pad)
    with pytest.raises(ConfigError, match="at step 8, but this run has 6 steps"):
        train(fresh(tiny_model_dir), ex, None, cfg(epochs=2), folder, pad_id=pad,
              resume_from=folder / "checkpoints" / "step-0000008")
