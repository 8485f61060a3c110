"""The best adapter by validation, early stopping, and metrics logged to TensorBoard / W&B.

The runs train on the demo rows and validate on the same prompts with a completion the training never
shows ("QZXJ ..."): as the model learns the training completions, the validation loss rises, so the best
evaluation is an early one. Expected steps are worked out from the logged evaluations by an independent
rule, never copied from the code under test.
"""

from __future__ import annotations

import json
import math
import types

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from loreft import ConfigError, ReftConfig, TrainConfig, attach
from loreft.data import Formatter, pad_id_for, tokenize_rows
from loreft.demo import DEMO_COMPLETION_TEMPLATE, DEMO_PROMPT_TEMPLATE, DEMO_ROWS
from loreft.reporting import TensorBoardLogger, WandbLogger
from loreft.trainer import latest_checkpoint, train

REFT = ReftConfig(layers="1;2", rank=2, positions="f1+l1", seed=0)


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    _, tok = mlx_lm.load(str(tiny_model_dir))
    fmt = Formatter(tok, prompt_template=DEMO_PROMPT_TEMPLATE, completion_template=DEMO_COMPLETION_TEMPLATE)
    train_set, _ = tokenize_rows(DEMO_ROWS, fmt, tok, 128)
    unseen = [{"instruction": r["instruction"], "output": "QZXJ QZXJ QZXJ"} for r in DEMO_ROWS]
    valid_set, _ = tokenize_rows(unseen, fmt, tok, 128, split="valid")
    return train_set, valid_set, pad_id_for(tok)


def fresh(tiny_model_dir):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    return attach(model, REFT)


def cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=1e-2, batch_size=2, iters=8, steps_per_report=2, steps_per_eval=2, save_every=2,
                warmup_ratio=0.0, seed=0)
    return TrainConfig(**{**base, **kw})


def weights(folder, name="adapter.safetensors") -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / name)).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def valid_losses(folder) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "eval" and r["split"] == "valid"]


def test_rising_validation_loss_keeps_the_earlier_adapter(tiny_model_dir, data, tmp_path):
    train_set, valid_set, pad = data
    out = tmp_path / "best"
    summary = train(fresh(tiny_model_dir), train_set, valid_set, cfg(), out, pad_id=pad)
    evals = valid_losses(out)
    assert [s for s, _ in evals] == [2, 4, 6, 8]
    best_step = min(evals, key=lambda e: e[1])[0]
    assert best_step < 8, f"the scenario needs a rising validation loss: {evals}"
    # the folder's adapter is that step's checkpoint, bit for bit; the last state is kept as a checkpoint
    assert same(weights(out), weights(out / "checkpoints" / f"step-{best_step:07d}"))
    assert latest_checkpoint(out).name == "step-0000008"
    assert not same(weights(out), weights(out / "checkpoints" / "step-0000008"))
    args = json.loads((out / "training_args.json").read_text())
    assert args["adapter_step"] == best_step and args["best"]["step"] == best_step
    assert args["best"]["metric"] == "eval_loss" and args["best"]["value"] == pytest.approx(dict(evals)[best_step])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows if r.get("best")] == [(best_step, "valid")]
    assert summary["adapter_step"] == best_step and summary["steps"] == 8 and not summary["stopped"]

    # best_metric="last" keeps the old behaviour: the folder holds the last state, the same as that checkpoint
    last = tmp_path / "last"
    train(fresh(tiny_model_dir), train_set, valid_set, cfg(best_metric="last"), last, pad_id=pad)
    assert same(weights(last), weights(out / "checkpoints" / "step-0000008"))


def expected_stop(evals: list[tuple[int, float]], patience: int, min_delta: float) -> int | None:
    """The step of the evaluation at which `patience` evaluations in a row failed to improve by more than min_delta."""
    best, waited = math.inf, 0
    for step, loss in evals:
        if best - loss > min_delta:
            waited = 0
        else:
            waited += 1
        best = min(best, loss)
        if waited >= patience:
            return step
    return None


@pytest.mark.parametrize("patience, min_delta", [(2, 0.0), (1, 0.0), (2, 10.0)])
def test_patience_stops_at_the_right_evaluation(tiny_model_dir, data, tmp_path, patience, min_delta):
    train_set, valid_set, pad = data
    full = tmp_path / "full"
    train(fresh(tiny_model_dir), train_set, valid_set, cfg(iters=16, best_metric="eval_loss"), full, pad_id=pad)
    want = expected_stop(valid_losses(full), patience, min_delta)
    assert want is not None and want < 16, valid_losses(full)

    out = tmp_path / "early"
    run = cfg(iters=16, early_stopping_patience=patience, early_stopping_min_delta=min_delta)
    summary = train(fresh(tiny_model_dir), train_set, valid_set, run, out, pad_id=pad)
    assert summary["steps"] == want and not summary["stopped"]
    assert summary["stop_reason"].startswith("early stopping") and f"in {patience} evaluation" in summary["stop_reason"]
    assert [s for s, _ in valid_losses(out)] == list(range(2, want + 1, 2))  # no evaluation after the stop
    best_step = min(valid_losses(out), key=lambda e: e[1])[0]
    assert same(weights(out), weights(out / "checkpoints" / f"step-{best_step:07d}"))




def test_resume_keeps_the_best_so_far(tiny_model_dir, data, tmp_path, stop_after):
    train_set, valid_set, pad = data
    whole = tmp_path / "whole"
    train(fresh(tiny_model_dir), train_set, valid_set, cfg(), whole, pad_id=pad)
    best_step = json.loads((whole / "training_args.json").read_text())["adapter_step"]
    assert best_step < 4  # the best comes before the checkpoint the second run resumes from

    parts = tmp_path / "parts"
    stopped = train(fresh(tiny_model_dir), train_set, valid_set, cfg(), parts, pad_id=pad, callbacks=[stop_after(5)])
    assert stopped["stopped"] and stopped["steps"] == 5
    resumed = train(fresh(tiny_model_dir), train_set, valid_set, cfg(), parts, pad_id=pad,
                    resume_from=parts / "checkpoints" / "step-0000004")
    assert resumed["steps"] == 8 and resumed["adapter_step"] == best_step
    assert same(weights(parts), weights(whole))


def test_selection_needs_its_evaluations(tiny_model_dir, data, tmp_path):
    train_set, valid_set, pad = data
    with pytest.raises(ConfigError, match="best_metric"):
        train(fresh(tiny_model_dir), train_set, valid_set, cfg(best_metric="test_exact_match"), tmp_path / "a", pad_id=pad)
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        train(fresh(tiny_model_dir), train_set, None, cfg(early_stopping_patience=2), tmp_path / "b", pad_id=pad)
    with pytest.raises(ConfigError, match="best_metric"):
        cfg(early_stopping_patience=2, best_metric="last").validate()


def test_tensorboard_files_hold_the_logged_scalars(tiny_model_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_set, valid_set, pad = data
    out = tmp_path / "tb"
    logger = TensorBoardLogger(out / "runs")
    train(fresh(tiny_model_dir), train_set, valid_set, cfg(iters=6, save_every=0), out, pad_id=pad, callbacks=[logger])
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval" and r["split"] == "valid"]
    want = {
        "train/loss": [(r["step"], r["loss"]) for r in train_rows],
        "train/learning_rate": [(r["step"], r["learning_rate"]) for r in train_rows],
        "train/tokens_per_sec": [(r["step"], r["tokens_per_sec"]) for r in train_rows],
        "eval/loss": [(r["step"], r["loss"]) for r in eval_rows],
        "eval/perplexity": [(r["step"], r["perplexity"]) for r in eval_rows],
    }
    assert set(want) <= set(events.Tags()["scalars"])
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, g), (_, w) in zip(got, points):
            assert g == pytest.approx(w, rel=1e-6), tag  # event files store float32


def test_report_to_tensorboard_writes_under_the_adapter_folder(tiny_model_dir, tmp_path):
    from loreft.job import job_from_params, run_job

    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    params = {"model": str(tiny_model_dir), "data": str(data_file), "iters": 4, "batch_size": 2, "rank": 1,
              "adapter_dir": str(tmp_path / "ad"), "steps_per_eval": 2, "report_to": "tensorboard"}
    summary = run_job(job_from_params(params), log=lambda *a: None)
    assert summary["steps"] == 4
    runs = tmp_path / "ad" / "runs"
    assert any(p.name.startswith("events.out.tfevents") for p in runs.iterdir())  # kept through the final save
    with pytest.raises(ConfigError, match="report_to"):
        job_from_params({**params, "report_to": "mlflow"})


class WandbStandIn:
    """A stand-in for the wandb module (the real one is a large optional extra): records init and log calls."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return types.SimpleNamespace(log=lambda metrics, step: self.calls.append(("log", step, metrics)),
                                     finish=lambda: self.calls.append(("finish",)))


def test_wandb_logs_the_same_names_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    stand_in = WandbStandIn()
    logger = WandbLogger(name="run", config={"rank": 2}, wandb=stand_in)
    logger.on_report({"kind": "train", "step": 3, "loss": 1.5, "learning_rate": 1e-3, "tokens_per_sec": 100.0, "eta_s": 9})
    logger.on_eval({"kind": "eval", "split": "valid", "step": 3, "loss": 2.0, "perplexity": math.exp(2.0), "tokens": 7})
    logger.on_end({})
    assert stand_in.calls[0] == ("init", {"project": "mlx-loreft", "name": "run", "config": {"rank": 2}, "mode": "offline"})
    assert stand_in.calls[1] == ("log", 3, {"train/loss": 1.5, "train/learning_rate": 1e-3, "train/tokens_per_sec": 100.0})
    assert stand_in.calls[2] == ("log", 3, {"eval/loss": 2.0, "eval/perplexity": math.exp(2.0)})
    assert stand_in.calls[3] == ("finish",)
