"""main.py as a TransformerLab task, against the real `transformerlab` package (`lab`).

Each test makes a job the way the app does (an experiment, a job whose job_data holds the task's
parameters), runs `python main.py` with _TFL_JOB_ID / _TFL_EXPERIMENT_ID and temporary TFL_HOME_DIR /
TFL_WORKSPACE_DIR, and reads the job's folder back: index.json, metrics.jsonl, checkpoints/, models/.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from loreft import load_adapter
from loreft.demo import DEMO_ROWS

lab_package = pytest.importorskip("lab", reason="the transformerlab package (pip install transformerlab) is needed")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "alpha"


@pytest.fixture
def tfl(tmp_path, monkeypatch, tiny_model_dir):
    """Temporary TransformerLab home and workspace, a dataset file, and a job factory."""
    home, workspace = tmp_path / "home", tmp_path / "workspace"
    home.mkdir()
    workspace.mkdir()
    monkeypatch.setenv("TFL_HOME_DIR", str(home))
    monkeypatch.setenv("TFL_WORKSPACE_DIR", str(workspace))
    data = tmp_path / "emoji.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    base = {"model_name": str(tiny_model_dir), "dataset": str(data), "adaptor_name": "myad", "rank": 2,
            "layers": "0;2", "positions": "f2+l2", "batch_size": 2, "iters": 20, "learning_rate": 0.01,
            "steps_per_report": 5, "steps_per_eval": 10, "save_every": 10,
            "formatting_template": "Q: {{instruction}}\nA: {{output}}"}

    def make_job(extra_job_data=None, **params) -> tuple[str, Path]:
        from lab import Experiment

        async def create():
            exp = await Experiment.create_or_get(EXPERIMENT, create_new=True)
            job = await exp.create_job()
            await job.update_job_data_fields({"parameters": {**base, **params}, **(extra_job_data or {})})
            return job.id, Path(await job.get_dir())

        return asyncio.run(create())

    return {"make_job": make_job, "tmp": tmp_path}


def run_main(tfl, job_id: str, wait: bool = True):
    env = {**os.environ, "_TFL_JOB_ID": job_id, "_TFL_EXPERIMENT_ID": EXPERIMENT, "PYTHONUNBUFFERED": "1"}
    cwd = tfl["tmp"] / f"run-{job_id}"
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def read_job(job_dir: Path) -> tuple[dict, list[dict]]:
    state = json.loads((job_dir / "index.json").read_text())
    metrics = job_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return state, rows


def saved_adapter(job_dir: Path, job_id: str) -> Path:
    return job_dir / "models" / f"{job_id}_myad"


def weights(path: Path) -> dict:
    return mx.load(str(path / "adapter.safetensors"))


# the keys the app's task.yaml schema accepts (transformerlab-app api/transformerlab/schemas/task.py, extra="forbid")
TASK_YAML_KEYS = {"name", "resources", "envs", "setup", "run", "github_repo_url", "github_repo_dir", "github_repo_branch",
                  "parameters", "sweeps", "minutes_requested"}


def test_task_yaml_parameters_are_what_main_reads():
    """task.yaml's defaults make a valid job, every parameter is read, and nothing undeclared is."""
    import yaml
    from test_plugin import Recording

    from loreft.job import job_from_params
    from loreft.transformerlab import (
        EXTRA_FIELDS,
        FORM_PARAMETERS,
        TASK_CONFIG_KEYS,
        job_params,
    )

    spec = yaml.safe_load((ROOT / "task.yaml").read_text())
    assert set(spec) <= TASK_YAML_KEYS and spec["run"] == "python main.py"
    params = Recording(spec["parameters"])
    job = job_from_params(job_params(params, task=True), strict=False)
    assert job.model == spec["parameters"]["model_name"] and job.data == spec["parameters"]["dataset"]
    assert job.adapter_dir == str(Path("adaptors") / spec["parameters"]["adaptor_name"])
    declared = {p.name for p in FORM_PARAMETERS} | set(EXTRA_FIELDS) | set(TASK_CONFIG_KEYS)
    assert params.read <= declared
    assert set(spec["parameters"]) - {"log_to_wandb"} <= params.read  # W&B: the app's integration reads it


def test_task_trains_reports_checkpoints_and_saves(tfl, tiny_model_dir):
    job_id, job_dir = tfl["make_job"]()
    code, out = run_main(tfl, job_id)
    assert code == 0, out
    state, rows = read_job(job_dir)
    data = state["job_data"]
    assert state["status"] == "COMPLETE" and state["progress"] == 100
    assert data["completion_status"] == "success"
    assert set(data["score"]) >= {"eval_loss", "eval_perplexity"} and data["score"]["eval_loss"] > 0
    train_steps = [r["step"] for r in rows if "train/loss" in r.get("metrics", {})]
    assert train_steps == [5, 10, 15, 20]
    assert [r["progress"] for r in rows if "train/loss" in r.get("metrics", {})] == [25, 50, 75, 100]
    assert [r["step"] for r in rows if "eval/loss" in r.get("metrics", {})] == [10, 20]
    assert (job_dir / "checkpoints" / "step-0000010" / "trainer_state.json").is_file()
    assert (job_dir / "artifacts" / "loss.png").is_file()
    adapter = saved_adapter(job_dir, job_id)
    assert data["adapter_path"] == str(adapter)
    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = load_adapter(model, adapter)
    assert data["trainable_parameters"] == reft.stats().trainable == 2 * 2 * (2 * 2 * 64 + 2)


def test_resume_from_a_checkpoint_reaches_the_same_adapter(tfl):
    """A job resumed (as the app does it) from another job's step-10 checkpoint ends with identical weights."""
    first_id, first_dir = tfl["make_job"]()
    assert run_main(tfl, first_id)[0] == 0
    second_id, second_dir = tfl["make_job"]({"parent_job_id": first_id, "resumed_from_checkpoint": "step-0000010"})
    code, out = run_main(tfl, second_id)
    assert code == 0, out
    _, rows = read_job(second_dir)
    assert [r["step"] for r in rows if "train/loss" in r.get("metrics", {})] == [15, 20]  # only steps 11-20 ran
    a, b = weights(saved_adapter(first_dir, first_id)), weights(saved_adapter(second_dir, second_id))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("how", ["sigterm", "stop_flag"])
def test_stop_leaves_a_loadable_adapter(tfl, tiny_model_dir, how):
    """The app's local provider sends SIGTERM; job_data.stop is its flag (set first). Either one stops cleanly."""
    from lab import Job

    job_id, job_dir = tfl["make_job"](iters=20000, steps_per_eval=0, save_every=0)
    proc = run_main(tfl, job_id, wait=False)
    deadline = time.monotonic() + 90
    while not (job_dir / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        async def stop():
            job = await Job.get(job_id, EXPERIMENT)
            await job.update_job_data_field("stop", True)
            await job.update_status("STOPPING")

        asyncio.run(stop())
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    state, _ = read_job(job_dir)
    assert state["status"] == "STOPPED" and state["job_data"].get("completion_status") != "success"
    assert "Stopped by user at step" in state["job_data"]["completion_details"]
    adapter = saved_adapter(job_dir, job_id)
    done = max(r["step"] for r in (json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()))
    assert 0 < done < 20000
    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, adapter)


def test_bad_parameter_marks_the_job_failed_naming_it(tfl):
    job_id, job_dir = tfl["make_job"](model_name=str(tfl["tmp"] / "no-such-model"), positions="l0")
    code, out = run_main(tfl, job_id)
    assert code == 1
    state, _ = read_job(job_dir)
    assert state["status"] == "FAILED" and state["job_data"]["completion_status"] == "failed"
    assert "positions='l0'" in state["job_data"]["completion_details"]
    assert "positions='l0'" in state["job_data"]["error_msg"] and "positions='l0'" in out
    assert not (job_dir / "models").exists() or not any((job_dir / "models").iterdir())
