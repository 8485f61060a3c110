"""The training engine: loss, supervision mask, schedule, resume, NaN, stop, seeds, files beside the adapter."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from loreft import ReftConfig, TrainConfig, attach, load_adapter
import loreft.trainer as trainer_module
from loreft.data import Example, collate
from loreft.reporting import Callback
from loreft.loss import completion_loss, stage_batches, supervised_positions
from loreft.trainer import LoopOptions, NonFiniteLossError, make_optimizer, train

REFT = ReftConfig(layers="1;2", rank=2, positions="f1+l1", seed=0)


def fresh(tiny_model_dir, cfg=REFT):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    return attach(model, cfg)


def cfg(**kw):
    base = dict(learning_rate=1e-2, batch_size=4, epochs=3, steps_per_report=1, steps_per_eval=0, warmup_ratio=0.0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(history):
    return [r["loss"] for r in history if r["kind"] == "train"]


class Recorder(Callback):
    def __init__(self):
        self.reports, self.evals, self.start, self.end = [], [], None, None

    def on_train_start(self, info):
        self.start = info

    def on_report(self, m):
        self.reports.append(m)

    def on_eval(self, m):
        self.evals.append(m)

    def on_end(self, s):
        self.end = s


def test_completion_loss_supervises_completion_tokens_only(tiny_model_dir, examples):
    ex, pad = examples
    reft = fresh(tiny_model_dir)
    batch = collate(ex[:3], pad_id=pad, pad_to=32)
    tokens, mask = mx.array(batch.tokens), mx.array(batch.loss_mask())
    reft.set_locations(reft.locations(batch.prompt_lengths))
    total, n = completion_loss(reft.model, tokens, mask)
    logits = np.array(reft.model(tokens[:, :-1]), dtype=np.float64)
    # independent float64 cross-entropy over exactly the completion targets (EOS included)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected, count = 0.0, 0
    for b in range(3):
        p, length = batch.prompt_lengths[b], batch.lengths[b]
        for t in range(p - 1, length - 1):  # target t+1 runs over the completion
            expected -= logp[b, t, batch.tokens[b, t + 1]]
            count += 1
    assert int(n.item()) == count == sum(len(e.completion) for e in ex[:3])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # a prompt token's label never counts: changing a prompt target (same inputs) leaves the loss unchanged
    changed = np.array(batch.tokens)
    changed[0, 1] = (changed[0, 1] + 7) % 100
    logits2 = reft.model(mx.array(changed)[:, :-1])  # only the label of position 0 and later inputs change...
    # ...so compare the masked loss computed from the original logits with a relabelled prompt target
    ce_orig = completion_loss(reft.model, tokens, mask)[0].item()
    targets = np.array(batch.tokens)[:, 1:].copy()
    targets[0, 0] = (targets[0, 0] + 7) % 100  # label of prompt position 0
    import mlx.nn as nn

    relabelled = (nn.losses.cross_entropy(reft.model(tokens[:, :-1]), mx.array(targets)) * mask).sum().item()
    assert relabelled == pytest.approx(ce_orig, rel=1e-6)
    assert logits2.shape == logits.shape
    # padding: replacing pad ids by other tokens changes nothing (right padding, causal model, masked targets)
    noisy = np.array(batch.tokens)
    for b in range(3):
        noisy[b, batch.lengths[b]:] = 5
    assert completion_loss(reft.model, mx.array(noisy), mask)[0].item() == pytest.approx(total.item(), rel=1e-6)
    reft.set_locations(None)


def test_loss_falls_on_memorizable_data_and_files_are_written(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    reft = fresh(tiny_model_dir, ReftConfig(layers="all", rank=4, positions="f1+l1", seed=0))
    rec = Recorder()
    out = tmp_path / "adapter"
    summary = train(reft, ex, ex[:4], cfg(epochs=25, learning_rate=2e-2, steps_per_report=5), out, callbacks=[rec], pad_id=pad, test_set=ex[4:8])
    first, last = rec.reports[0]["loss"], rec.reports[-1]["loss"]
    assert last < 0.75 * first, (first, last)  # a random tiny base model: ReFT lowers the loss, it cannot memorize
    assert rec.start["trainable"] == summary["trainable"] == sum(v.size for v in reft.parameters().values())
    assert [e["split"] for e in rec.evals] == ["valid", "test"]
    assert summary["valid"]["perplexity"] == pytest.approx(math.exp(summary["valid"]["loss"]))
    assert rec.reports[-1]["progress"] == 1.0 and rec.reports[-1]["eta_s"] == 0
    assert all(r["tokens_per_sec"] > 0 for r in rec.reports)
    for name in ("reft_config.json", "adapter.safetensors", "training_args.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [r["loss"] for r in rec.reports]
    assert json.loads((out / "training_args.json").read_text())["train"]["epochs"] == 25
    # the saved adapter reproduces the trained model exactly
    model2, _ = mlx_lm.load(str(tiny_model_dir))
    reft2 = load_adapter(model2, out)
    x = mx.array([ex[0].prompt + ex[0].completion])
    for r in (reft, reft2):
        r.model.eval()
        r.set_locations(r.locations([len(ex[0].prompt)]))
    assert np.array_equal(np.array(reft.model(x)), np.array(reft2.model(x)))
    assert reft.max_orthogonality_error() < 1e-5


def test_same_seed_same_run_and_other_seed_differs(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        reft = fresh(tiny_model_dir, ReftConfig(layers="1;2", rank=2, positions="f1+l1", seed=seed))
        runs.append(losses(train(reft, ex, None, cfg(seed=seed), tmp_path / str(i), pad_id=pad) and
                           [json.loads(l) for l in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_resume_equals_uninterrupted_run(tiny_model_dir, examples, tmp_path, stop_after):
    ex, pad = examples
    config = cfg(epochs=4, save_every=3, grad_accumulation_steps=1, lr_schedule="cosine", warmup_ratio=0.2)
    full = train(fresh(tiny_model_dir), ex, None, config, tmp_path / "full", pad_id=pad)

    part = train(fresh(tiny_model_dir), ex, None, config, tmp_path / "run", pad_id=pad, callbacks=[stop_after(7)])
    assert part["stopped"] and part["steps"] == 7
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000006"
    assert ckpt.is_dir()
    resumed = train(fresh(tiny_model_dir), ex, None, config, tmp_path / "run", pad_id=pad, resume_from=ckpt)
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-5)
    a = mx.load(str(tmp_path / "full" / "adapter.safetensors"))
    b = mx.load(str(tmp_path / "run" / "adapter.safetensors"))
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k


def test_stop_request_saves_a_loadable_adapter(tiny_model_dir, examples, tmp_path):
    ex, pad = examples

    class StopNow(Callback):
        def should_stop(self):
            return True

    summary = train(fresh(tiny_model_dir), ex, None, cfg(epochs=10), tmp_path / "a", pad_id=pad, callbacks=[StopNow()])
    assert summary["stopped"] and summary["steps"] == 1
    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = load_adapter(model, tmp_path / "a")
    assert set(reft.parameters()) == set(fresh(tiny_model_dir).parameters())
    # step 2 was already queued when the stop came: it was undone, so the adapter is one step's training
    one_step = train(fresh(tiny_model_dir), ex, None, cfg(iters=1, lr_schedule="constant"), tmp_path / "b", pad_id=pad)
    stopped = train(fresh(tiny_model_dir), ex, None, cfg(epochs=10, lr_schedule="constant"), tmp_path / "c", pad_id=pad,
                    callbacks=[StopNow()])
    assert one_step["steps"] == stopped["steps"] == 1
    a, b = (mx.load(str(tmp_path / d / "adapter.safetensors")) for d in "bc")
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) < 1e-6


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    reft = fresh(tiny_model_dir)

    class Poison(Callback):
        def on_checkpoint(self, step, path):
            if step == 2:  # corrupt the weights once checkpoint 2 is written (as a bad update would): step 3's loss is NaN
                iv = next(iter(reft.interventions().values()))
                iv.weight = mx.full(iv.weight.shape, float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*step-0000002"):
        train(reft, ex, None, cfg(epochs=10, save_every=2), tmp_path / "a", pad_id=pad, callbacks=[Poison()])
    good = mx.load(str(tmp_path / "a" / "checkpoints" / "step-0000002" / "adapter.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in good.values())
    assert not (tmp_path / "a" / "adapter.safetensors").exists()  # no final adapter made of NaNs
    assert not (tmp_path / "a" / "checkpoints" / "step-0000004").exists()


def test_bad_update_is_never_checkpointed(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    reft = fresh(tiny_model_dir)

    class Poison(Callback):  # the weights go bad right before a checkpoint is due
        def on_step(self, step, total):
            if step == 4:
                iv = next(iter(reft.interventions().values()))
                iv.bias = mx.full(iv.bias.shape, float("inf"))

    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite at step 4.*step-0000002"):
        train(reft, ex, None, cfg(epochs=10, save_every=2), tmp_path / "a", pad_id=pad, callbacks=[Poison()])
    assert not (tmp_path / "a" / "checkpoints" / "step-0000004").exists()


def test_schedule_warmup_then_linear_decay():
    opt = make_optimizer(TrainConfig(learning_rate=1.0, warmup_ratio=0.2, lr_schedule="linear", epochs=1), 10)
    sched = opt._schedulers["learning_rate"]
    values = [float(sched(mx.array(s)).item()) for s in range(10)]
    # independent formula: 2 warmup updates ramp to 1.0, then 8 updates fall linearly from 1.0 to 0
    expected = [0.5, 1.0] + [1.0 - i / 8 for i in range(8)]
    assert np.allclose(values, expected, atol=1e-6)


def test_grad_accumulation_matches_large_batch(tiny_model_dir, tmp_path):
    # completions of 1 to 4 tokens: the two micro-batches hold different numbers of targets, so only a token
    # mean over the whole accumulated batch (not a mean of the micro-batches' means) equals the large batch
    rows = [{"p": [1, 2, 3, 4], "c": [5 + i % 3, 6, 2, 7][: 1 + i % 4]} for i in range(8)]
    from loreft.data import Example

    ex = [Example(prompt=r["p"], completion=r["c"]) for r in rows]
    big = train(fresh(tiny_model_dir), ex, None, cfg(batch_size=8, epochs=3), tmp_path / "big")
    small = train(fresh(tiny_model_dir), ex, None, cfg(batch_size=4, grad_accumulation_steps=2, epochs=3, learning_rate=1e-2), tmp_path / "small")
    a = mx.load(str(tmp_path / "big" / "adapter.safetensors"))
    b = mx.load(str(tmp_path / "small" / "adapter.safetensors"))
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
    assert big["steps"] * 2 == small["steps"]


def test_mixed_precision_keeps_interventions_and_optimizer_in_float32(tiny_model_dir, examples, tmp_path):
    from mlx.utils import tree_flatten

    from loreft.job import load_model
    from loreft.trainer import resolve_dtype

    assert resolve_dtype("auto") == (mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32)
    ex, pad = examples
    model, _ = load_model(str(tiny_model_dir), "bfloat16")
    reft = attach(model, REFT)
    base = [v.dtype for k, v in tree_flatten(model.parameters()) if "interventions" not in k]
    assert set(base) == {mx.bfloat16}
    summary = train(reft, ex, None, cfg(epochs=1), tmp_path / "a", pad_id=pad)
    assert math.isfinite(summary["train_loss"])
    assert {v.dtype for v in reft.parameters().values()} == {mx.float32}
    saved = mx.load(str(tmp_path / "a" / "adapter.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.float32}
    # the edit is computed in float32 and cast back: block outputs stay bfloat16
    x = mx.array([ex[0].prompt])
    reft.set_locations(reft.locations([len(ex[0].prompt)]))
    assert model(x).dtype == mx.bfloat16


def test_reported_learning_rate_is_the_one_each_update_used(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    summary = train(fresh(tiny_model_dir), ex, None, cfg(epochs=2, lr_schedule="linear"), tmp_path / "a", pad_id=pad)
    total = summary["total_steps"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    reported = [(r["step"], r["learning_rate"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in reported] == list(range(1, total + 1))
    # no warmup: update k (1-based) uses 1e-2 * (1 - (k - 1) / total), read while the next step is queued
    for step, lr in reported:
        assert lr == pytest.approx(1e-2 * (1 - (step - 1) / total), rel=1e-5), step


def test_staged_inputs_are_each_batchs_own_arrays(tiny_model_dir):
    # several batches of different widths, one with and one without supervised-position picks, uploaded as one array
    reft = fresh(tiny_model_dir, ReftConfig(layers="1", rank=2, positions="f2+l1", seed=0))
    rng = np.random.default_rng(0)
    rows = [[(rng.integers(3, 50, 9).tolist(), rng.integers(3, 50, 4).tolist()),
             (rng.integers(3, 50, 5).tolist(), rng.integers(3, 50, 2).tolist())],
            [(rng.integers(3, 50, 3).tolist(), rng.integers(3, 50, 60).tolist())]]
    batches = [collate([Example(p, c) for p, c in r], pad_id=0, pad_to=8) for r in rows]
    staged = stage_batches(reft, batches)
    assert len(staged) == 2
    for batch, (tokens, mask, locs, supervised, total) in zip(batches, staged):
        host = reft.locations(batch.prompt_lengths, host=True).as_arrays()
        want = supervised_positions(batch.loss_mask(), batch.tokens[:, 1:])
        assert tokens.dtype == mx.int32 and np.array_equal(np.array(tokens), batch.tokens)
        assert mask.dtype == mx.float32 and np.array_equal(np.array(mask), batch.loss_mask())
        assert len(locs) == len(host) and all(
            a.dtype == (mx.float32 if h.dtype == np.float32 else mx.int32) and np.array_equal(np.array(a), h)
            for a, h in zip(locs, host))
        assert (supervised is None) == (want is None)
        if supervised is not None:
            assert np.array_equal(np.array(supervised), want)
        assert total.shape == () and total.item() == int(batch.lengths.sum())
    assert staged[0][3] is not None and staged[1][3] is None  # 3/4+ supervised: full logits, no positions


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="rows are split over streams on a CPU only")
@pytest.mark.parametrize("streams", [2, 3])
def test_rows_split_over_cpu_streams_train_as_one_batch(tiny_model_dir, tmp_path, streams):
    # batches of 5 and 3 rows with 1 to 4 completion tokens: the shards hold different numbers of rows and
    # targets, so only loss sums and target counts added over the shards (not a mean of their means) match
    rows = [([1, 2, 3, 4], [5 + i % 3, 6, 2, 7][: 1 + i % 4]) for i in range(8)]
    ex = [Example(prompt=p, completion=c) for p, c in rows]
    assert trainer_module.row_shards(LoopOptions(cpu_streams=streams)) == streams
    runs = {}
    for n in (1, streams):
        summary = train(fresh(tiny_model_dir), ex, None, cfg(batch_size=5, epochs=2), tmp_path / str(n),
                        options=LoopOptions(cpu_streams=n))
        history = [json.loads(line) for line in (tmp_path / str(n) / "metrics.jsonl").read_text().splitlines()]
        runs[n] = (mx.load(str(tmp_path / str(n) / "adapter.safetensors")), losses(history), summary["steps"])
    (one, one_losses, one_steps), (split, split_losses, split_steps) = runs[1], runs[streams]
    assert one_steps == split_steps == 4
    assert split_losses == pytest.approx(one_losses, rel=1e-5)
    for k in one:
        assert np.allclose(np.array(one[k]), np.array(split[k]), atol=1e-5), k


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="rows are split over streams on a CPU only")
def test_rows_stay_on_one_stream_where_mlx_would_run_the_streams_one_after_the_other(monkeypatch):
    assert trainer_module.row_shards(LoopOptions()) == 2  # the test session ran backend.setup()
    assert trainer_module.row_shards(LoopOptions(), world_size=2) == 1
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "20")  # MLX's own width: one stream's chain, then the other's
    assert trainer_module.row_shards(LoopOptions()) == 1
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH")  # no setup() at all
    assert trainer_module.row_shards(LoopOptions()) == 1


def test_cpu_streams_share_blas_threads_in_training_steps_and_evaluations_get_them_all(tiny_model_dir, examples,
                                                                                         tmp_path, monkeypatch):
    import loreft.blas as blas
    import loreft.bookkeeper as bookkeeper

    if blas._library is None:
        pytest.skip("no fast BLAS loaded: nothing to share")
    threads = lambda: blas._library.MKL_Get_Max_Threads()  # noqa: E731
    seen, during_eval = [], []

    class ThreadsDuringTraining(Callback):
        def on_report(self, m):
            seen.append(threads())

    def evaluate_loss(*args, **kw):
        during_eval.append(threads())
        return real_evaluate_loss(*args, **kw)

    real_evaluate_loss = bookkeeper.evaluate_loss
    monkeypatch.setattr(bookkeeper, "evaluate_loss", evaluate_loss)
    ex, pad = examples
    before = threads()
    train(fresh(tiny_model_dir), ex, ex[:4], cfg(epochs=1, steps_per_eval=2), tmp_path / "a", pad_id=pad,
          callbacks=[ThreadsDuringTraining()], options=LoopOptions(cpu_streams=2))
    assert seen and set(seen) == {max(1, before // 2)}
    assert during_eval and set(during_eval) == {before}
    assert threads() == before


@pytest.mark.parametrize("cuda", [True, False])
def test_training_caps_mlx_buffer_cache_on_cuda_only_and_restores_it(tiny_model_dir, examples, tmp_path, monkeypatch, cuda):
    import loreft.bookkeeper as bookkeeper

    monkeypatch.setattr(bookkeeper, "_on_cuda", lambda: cuda)
    seen = []

    class CacheLimitDuringTraining(Callback):
        def on_report(self, m):
            limit = mx.set_cache_limit(0)  # MLX has no getter: setting returns the limit in force
            mx.set_cache_limit(limit)
            seen.append(limit)

    ex, pad = examples
    users = 7 * 2**30
    before = mx.set_cache_limit(users)
    try:
        train(fresh(tiny_model_dir), ex, None, cfg(epochs=1), tmp_path / "a", pad_id=pad, callbacks=[CacheLimitDuringTraining()])
    finally:
        after = mx.set_cache_limit(before)
    assert seen and set(seen) == {bookkeeper.TRAINING_CACHE_LIMIT if cuda else users}
    assert after == users


def test_upload_chunk_size_does_not_change_training(tiny_model_dir, examples, tmp_path):
    ex, pad = examples
    runs = []
    for size in (32, 5, 1):
        train(fresh(tiny_model_dir), ex, None, cfg(epochs=2), tmp_path / str(size), pad_id=pad,
              options=LoopOptions(stage_steps=size))
        runs.append(mx.load(str(tmp_path / str(size) / "adapter.safetensors")))
    for other in runs[1:]:
        for k in runs[0]:
            assert np.array_equal(np.array(runs[0][k]), np.array(other[k])), k


def test_few_rows_per_gpu_gets_a_note_on_cuda_only(monkeypatch):
    from loreft.reporting import start_lines
    from loreft.trainer import ROWS_PER_GPU_TO_SCALE, _run_notes

    small, large = cfg(batch_size=2 * (ROWS_PER_GPU_TO_SCALE - 1)), cfg(batch_size=2 * ROWS_PER_GPU_TO_SCALE)
    monkeypatch.setattr(trainer_module.mx.cuda, "is_available", lambda: True)
    notes = _run_notes(small, 2)
    assert len(notes) == 1 and f"trains {ROWS_PER_GPU_TO_SCALE - 1} rows" in notes[0]
    assert _run_notes(large, 2) == [] and _run_notes(small, 1) == []
    lines = start_lines({"trainable": 10, "total_parameters": 1000, "percent": 1.0, "notes": notes})
    assert lines[0].startswith("Trainable parameters: 10 of 1,000") and lines[1] == "Note: " + notes[0]
    monkeypatch.setattr(trainer_module.mx.cuda, "is_available", lambda: False)  # measured on NCCL ranks only
    assert _run_notes(small, 2) == []
