"""One job from flat parameters: coercion, presets, fail-fast validation, and the test split's exact match."""

from __future__ import annotations

import json

import pytest

from loreft import ConfigError
from loreft.config import PRESETS
from loreft.demo import DEMO_COMPLETION_TEMPLATE, DEMO_PROMPT_TEMPLATE, DEMO_ROWS
from loreft.job import PARAMETERS, job_from_params, run_job
from loreft.reporting import Callback


def test_strings_are_coerced_like_transformerlab_sends_them():
    job = job_from_params({"model": "m", "data": "d", "rank": "8", "share_weights": "true", "learning_rate": "0.001",
                           "epochs": "3.0", "positions": "f2+l2"})
    assert (job.reft.rank, job.reft.share_weights, job.train.learning_rate, job.train.epochs) == (8, True, 1e-3, 3)
    with pytest.raises(ConfigError, match=r"rank='8.5'.*int"):
        job_from_params({"model": "m", "data": "d", "rank": "8.5"})
    with pytest.raises(ConfigError, match=r"share_weights='maybe'"):
        job_from_params({"model": "m", "data": "d", "share_weights": "maybe"})


def test_preset_then_explicit_values_win():
    job = job_from_params({"model": "m", "data": "d", "preset": "commonsense", "rank": 2})
    assert job.reft.positions == PRESETS["commonsense"]["reft"]["positions"] and job.reft.share_weights is True
    assert job.reft.rank == 2 and job.train.learning_rate == PRESETS["commonsense"]["train"]["learning_rate"]
    with pytest.raises(ConfigError, match=r"preset='fast'.*commonsense"):
        job_from_params({"model": "m", "data": "d", "preset": "fast"})


def test_unknown_parameter_is_an_error_unless_lenient():
    with pytest.raises(ConfigError, match=r"ranq"):
        job_from_params({"model": "m", "data": "d", "ranq": 4})
    assert job_from_params({"model": "m", "data": "d", "job_id": 7}, strict=False).reft.rank == 4


def test_bad_template_fails_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    import mlx_lm

    def untouched(*a, **k):
        raise AssertionError("the model loaded before the template was checked")

    monkeypatch.setattr(mlx_lm, "load", untouched)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    job = job_from_params({"model": str(tiny_model_dir), "data": str(data), "adapter_dir": str(tmp_path / "out"),
                           "prompt_template": "{{ question }}", "completion_template": "{{ output }}"})
    with pytest.raises(ValueError, match=r"question.*instruction, output"):
        run_job(job, log=lambda *a: None)


def test_test_split_is_scored_by_exact_match_and_written_beside_the_adapter(tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("train", DEMO_ROWS), ("valid", DEMO_ROWS[:3]), ("test", DEMO_ROWS[:4])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = job_from_params({
        "model": str(tiny_model_dir), "data": str(folder), "adapter_dir": str(tmp_path / "adapter"),
        "prompt_template": DEMO_PROMPT_TEMPLATE, "completion_template": DEMO_COMPLETION_TEMPLATE,
        "layers": "all", "positions": "f5+l5", "rank": 8, "learning_rate": 3e-2, "batch_size": 10, "epochs": 60,
        "warmup_ratio": 0, "steps_per_eval": 0,
    })

    class Evals(Callback):
        rows: list = []

        def on_eval(self, m):
            self.rows.append(m)

    summary = run_job(job, callbacks=[Evals()], log=lambda *a: None)
    test = summary["test"]
    assert {"loss", "perplexity", "exact_match", "normalized_exact_match"} <= set(test)
    assert 0.0 <= test["exact_match"] <= test["normalized_exact_match"] <= 1.0
    assert test["exact_match"] > 0  # the tiny model learns the emoji answers it was trained on
    assert [r["split"] for r in Evals.rows] == ["valid", "test"] and Evals.rows[-1]["exact_match"] == test["exact_match"]
    written = json.loads((tmp_path / "adapter" / "eval.json").read_text())
    assert written["exact_match"] == test["exact_match"] and written["split"] == "test"


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.minimum is not None or p.maximum is not None],
                         ids=lambda p: p.name)
def test_the_tables_bounds_and_finiteness_are_enforced(param):
    """Every bounded parameter refuses a value just outside its range, and NaN / infinity, as the app sends them (text)."""
    step = 1 if param.type is int else 1e-3 * max(abs(param.minimum or 0), abs(param.maximum or 0), 1e-6)
    outside = ([param.minimum - step] if param.minimum is not None else []) + \
              ([param.maximum + step] if param.maximum is not None else [])
    if param.type is float:
        outside += [float("nan"), float("inf"), float("-inf")]
    for value in outside:
        with pytest.raises(ConfigError, match=param.name):
            job_from_params({"model": "m", "data": "d", param.name: str(value)}, strict=False)
    for value in (param.minimum, param.maximum):  # the bounds themselves are allowed
        if value is not None and not (param.name == "epochs" and value == 0):  # epochs 0 needs iters > 0
            job_from_params({"model": "m", "data": "d", param.name: str(value), "iters": "1"})
