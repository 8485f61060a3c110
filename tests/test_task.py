"""main.py as a TransformerLab task, against the real `transformerlab` package (`lab`).

Each test makes a job the way the app does (an experiment, a job whose job_data holds the task's
parameters), runs `python main.py` with _TFL_JOB_ID / _TFL_EXPERIMENT_ID and temporary TFL_HOME_DIR /
TFL_WORKSPACE_DIR, and reads the job's folder back: index.json, metrics.jsonl, checkpoints/, models/.
One test goes the app's whole way (transformerlab-app's task_service, launch_template, local provider,
process_registry): upload, copy the task's files into the run's home, task.yaml's run line under
tfl-remote-trap, and the app's Stop (stop flag, SIGTERM to every process, the trap's second SIGTERM,
SIGKILL after 3 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
import yaml

from loreft import load_adapter
from loreft.demo import DEMO_ROWS

lab_package = pytest.importorskip("lab", reason="the transformerlab package (pip install transformerlab) is needed")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "alpha"
sys.path.insert(0, str(ROOT / "tools"))
import make_plugin_files


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
    """task.yaml's parameters (schema dicts, as a launch without overrides sends them) make a valid job, every
    parameter is read, nothing undeclared is read, and the launch form gets dropdowns, bounds and pickers."""
    from test_plugin import Recording

    from loreft.job import PARAMS_BY_NAME, job_from_params
    from loreft.transformerlab import (
        EXTRA_FIELDS,
        FORM_PARAMETERS,
        TASK_CONFIG_KEYS,
        app_config,
        job_params,
    )

    spec = yaml.safe_load((ROOT / "task.yaml").read_text())
    assert set(spec) <= TASK_YAML_KEYS and spec["run"] == "exec python main.py" and "{{secret" not in str(spec)
    plain, notes = app_config(spec["parameters"], task=True)
    assert notes == []
    params = Recording(plain)
    job = job_from_params(job_params(params, task=True), strict=False)
    schemas = spec["parameters"]
    assert job.model == schemas["model_name"]["default"] and job.data == schemas["dataset"]["default"]
    assert job.adapter_dir == str(Path("adaptors") / schemas["adaptor_name"]["default"])
    assert job.train.save_every > 0  # checkpoints on by default in the app: its Resume needs them
    declared = {p.name for p in FORM_PARAMETERS} | set(EXTRA_FIELDS) | set(TASK_CONFIG_KEYS)
    assert params.read <= declared
    assert set(spec["parameters"]) - {"log_to_wandb"} <= params.read  # W&B: the app's integration reads it
    # the app's schema style (its ParameterSchema: type, default, min, max, options, ui_widget)
    assert schemas["model_name"]["ui_widget"] == "lab_model_select" and schemas["dataset"]["ui_widget"] == "lab_dataset_select"
    for name, schema in schemas.items():
        assert schema["type"] in ("int", "float", "bool", "enum", "string"), name
        p = PARAMS_BY_NAME.get(name)
        if p is not None and p.enum is not None:
            assert schema["type"] == "enum" and schema["options"] == list(p.enum) and schema["default"] in p.enum
        if p is not None and p.minimum is not None:
            assert schema["min"] == p.minimum and schema["default"] >= schema["min"]
        if p is not None and p.maximum is not None:
            assert schema["max"] == p.maximum and schema["default"] <= schema["max"]
        if p is not None and p.type is float:
            assert schema["type"] == "float" and isinstance(schema["default"], float)
    # the sweep example: real parameters, ranked by a metric the job puts in its score
    sweeps = spec["sweeps"]
    assert set(sweeps["sweep_config"]) <= set(schemas) and sweeps["sweep_metric"] == "eval/loss"


def test_task_trains_reports_checkpoints_and_saves(tfl, tiny_model_dir):
    job_id, job_dir = tfl["make_job"]()
    code, out = run_main(tfl, job_id)
    assert code == 0, out
    state, rows = read_job(job_dir)
    data = state["job_data"]
    assert state["status"] == "COMPLETE" and state["progress"] == 100
    assert data["completion_status"] == "success"
    assert set(data["score"]) >= {"eval/loss", "eval/perplexity"} and data["score"]["eval/loss"] > 0
    sweep_metric = yaml.safe_load((ROOT / "task.yaml").read_text())["sweeps"]["sweep_metric"]
    assert sweep_metric in data["score"]  # what a sweep ranks its runs by
    reported = {k for r in rows for k in r.get("metrics", {})}
    assert set(data["score"]) - {"discard"} <= reported  # the score's keys are the metric names the job reported
    # ("discard" is lab.finish's own flag)
    lines = [line for line in out.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert [line.split("/")[0] for line in lines] == ["step 5", "step 10", "step 15", "step 20"]
    assert lines[-1].endswith("ETA 0s")
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


def set_stop_flag(job_id: str) -> None:
    """The app's Stop button, first half: the job's stop flag and STOPPING."""
    from lab import Job

    async def stop():
        job = await Job.get(job_id, EXPERIMENT)
        await job.update_job_data_field("stop", True)
        await job.update_status("STOPPING")

    asyncio.run(stop())


def stop_flag_is_set(job_dir: Path) -> bool:
    try:
        return bool(json.loads((job_dir / "index.json").read_text())["job_data"].get("stop"))
    except (ValueError, KeyError):  # caught mid-write
        return False


def test_a_job_that_sees_the_stop_flag_before_the_apps_stopping_still_ends_stopped(tfl, tmp_path, monkeypatch):
    """The app's Stop writes job_data.stop, then STOPPING; a job publishing in between must not end at STOPPING."""
    import threading

    from lab import Job, JobStatus
    from lab import lab as lab_facade

    from loreft.transformerlab import TaskReporter

    job_id, job_dir = tfl["make_job"]()
    monkeypatch.setenv("_TFL_JOB_ID", job_id)
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", EXPERIMENT)
    lab_facade.init()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.safetensors").write_bytes(b"0")

    async def app_stop_first_half():
        job = await Job.get(job_id, EXPERIMENT)
        await job.update_job_data_field("stop", True)

    async def app_stop_second_half():
        await (await Job.get(job_id, EXPERIMENT)).update_status(JobStatus.STOPPING)

    asyncio.run(app_stop_first_half())
    late = threading.Timer(0.3, lambda: asyncio.run(app_stop_second_half()))  # the app's second write, landing late
    late.start()
    TaskReporter(lab_facade, log=lambda line: None).publish({"adapter": str(adapter), "stopped": True, "steps": 3, "total_steps": 9})
    late.join()
    state, _ = read_job(job_dir)
    assert state["status"] == "STOPPED"
    assert state["job_data"]["completion_details"].startswith("Stopped by user at step 3 of 9")


def test_the_stop_flag_alone_stops_with_a_loadable_adapter(tfl, tiny_model_dir):
    """Providers that cannot signal the process leave only job_data.stop: it stops training cleanly too."""
    job_id, job_dir = tfl["make_job"](iters=20000, steps_per_eval=0, save_every=0)
    proc = run_main(tfl, job_id, wait=False)
    deadline = time.monotonic() + 90
    while not (job_dir / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    # lab writes the job's index.json whole and without a lock, in the job and in the app alike: a report
    # written while the flag is being set can drop it, so the flag is set again until the job has it
    while proc.poll() is None and time.monotonic() < deadline:
        if not stop_flag_is_set(job_dir):
            set_stop_flag(job_id)
        time.sleep(0.2)
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


# ---------------------------------------------------------------------------------------------------
# The app's whole way: upload, launch on the local provider, Stop


def upload_as_the_app_does(folder: Path, work: Path) -> tuple[str, dict]:
    """transformerlab-app's task upload (cli `lab task add` zips the folder; task_service.create_task_from_zip_path):
    the task's metadata is written to <task>/index.json first, then the upload is copied over the task folder."""
    from lab import storage
    from lab.task_template import TaskTemplate

    archive = work / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder))
    extracted = work / "extracted"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(extracted)
    task_yaml = next(Path(root) / "task.yaml" for root, _, files in os.walk(extracted) if "task.yaml" in files)
    spec = yaml.safe_load(task_yaml.read_text())
    task_data = {k: spec[k] for k in ("name", "run", "setup", "parameters") if k in spec}
    task_data.update(experiment_id=EXPERIMENT, type="REMOTE", plugin="remote_orchestrator")
    task_id = str(uuid.uuid4())

    async def create():
        task = await TaskTemplate.create(task_id, experiment_id=EXPERIMENT)
        await task.set_metadata(**task_data)
        await storage.copy_dir(str(task_yaml.parent), await task.get_dir())
        task = await TaskTemplate.get(task_id, experiment_id=EXPERIMENT)
        await task.set_metadata(file_mounts=True)
        return await task.get_metadata()

    return task_id, asyncio.run(create())


def test_upload_keeps_the_tasks_metadata_only_from_the_task_folder(tfl):
    """The repository root's index.json (the plugin's) would replace the uploaded task's metadata; the folder
    `make_plugin_files.py --task-folder` writes has no index.json, so the task keeps its id, run and setup."""
    spec = yaml.safe_load((ROOT / "task.yaml").read_text())
    root_like = tfl["tmp"] / "root_like"
    root_like.mkdir()
    for name in ("index.json", "task.yaml", "main.py"):
        shutil.copy2(ROOT / name, root_like / name)
    (tfl["tmp"] / "u1").mkdir()
    _, clobbered = upload_as_the_app_does(root_like, tfl["tmp"] / "u1")
    assert "run" not in clobbered  # what happens to an upload of the repository as it is

    folder = make_plugin_files.write_task_folder(tfl["tmp"] / "task_folder")
    assert not (folder / "index.json").exists() and (folder / "task.yaml").read_text() == (ROOT / "task.yaml").read_text()
    (tfl["tmp"] / "u2").mkdir()
    task_id, meta = upload_as_the_app_does(folder, tfl["tmp"] / "u2")
    assert (meta["id"], meta["run"], meta["setup"]) == (task_id, spec["run"], spec["setup"])


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (what psutil's children(recursive=True) gives the app)."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for row in rows:
        if row.strip():
            child, parent = map(int, row.split())
            children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _alive(pid: int) -> bool:
    """Running, not exited and not a zombie waiting to be reaped (as psutil.wait_procs counts them)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def stop_as_the_app_does(root: subprocess.Popen, job_id: str) -> dict:
    """The Stop button on the local provider: the stop flag (STOPPING), then process_registry's
    _terminate_process_tree: SIGTERM to every process of the tree, wait 3 s, SIGKILL the survivors."""
    set_stop_flag(job_id)
    tree = _process_tree(root.pid)
    sent = time.time()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and (root.poll() is None or any(_alive(p) for p in tree)):
        time.sleep(0.02)
    killed = [p for p in tree if _alive(p)]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    return {"sigterm_at": sent, "killed": killed, "tree": tree}


def test_upload_launch_and_stop_as_the_app_does(tfl, tiny_model_dir):
    """Upload, launch on the local provider and Stop, each step as transformerlab-app does it, with the real
    transformerlab 0.1.46 and its tfl-remote-trap; /bin/sh is dash on Debian and Ubuntu."""
    from test_plugin import overlay_venv

    spec = yaml.safe_load((ROOT / "task.yaml").read_text())
    folder = make_plugin_files.write_task_folder(tfl["tmp"] / "task_folder")
    (tfl["tmp"] / "upload").mkdir()
    task_id, _ = upload_as_the_app_does(folder, tfl["tmp"] / "upload")
    params = {k: v for k, v in spec["parameters"].items() if k not in ("model_name", "dataset", "adaptor_name")}
    params.update(iters=20000, steps_per_eval=0, save_every=0, rank=2, layers="0;2", positions="f2+l2",
                  batch_size=2, steps_per_report=5, max_seq_length=64)  # the launch form's values win (config)
    job_id, job_dir = tfl["make_job"]({"task_id": task_id}, **params)

    # local.py: HOME and cwd = the run's workspace, a venv there (holding the app's transformerlab), setup, run
    home = tfl["tmp"] / f"job-{job_id}" / "workspace"
    home.mkdir(parents=True)
    venv_bin = overlay_venv(home / "venv").parent
    env = {**os.environ, "HOME": str(home), "VIRTUAL_ENV": str(venv_bin.parent), "_TFL_JOB_ID": job_id,
           "_TFL_EXPERIMENT_ID": EXPERIMENT, "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1",
           "PATH": os.pathsep.join([str(venv_bin), str(Path(sys.executable).parent), os.environ["PATH"]])}
    env.pop("PYTHONPATH", None)
    copy_mounts = 'python -c "from lab import lab; lab.copy_file_mounts()"'  # launch_credentials.COPY_FILE_MOUNTS_SETUP
    setup = subprocess.run(["/bin/bash", "-c", f"set -e -o pipefail; {copy_mounts} && {spec['setup']}"], cwd=home,
                           env=env, capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert (home / "main.py").is_file() and (home / "loreft" / "trainer.py").is_file()
    assert "Keeping the app's transformerlab" in setup.stdout

    run = f"tfl-remote-trap -- {shlex.quote(spec['run'])}"  # launch_template wraps the run line so
    proc = subprocess.Popen(["/bin/bash", "-c", run], cwd=home, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (job_dir / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    stop = stop_as_the_app_does(proc, job_id)
    out, _ = proc.communicate(timeout=30)

    adapter = home / "adaptors" / "myad"  # relative to the run's cwd; tfl's jobs are named myad
    saved_after = (adapter / "adapter.safetensors").stat().st_mtime - stop["sigterm_at"]
    print(f"adapter saved {saved_after:.2f}s after the SIGTERM; SIGKILLed: {stop['killed']}; "
          f"/bin/sh -> {os.path.realpath('/bin/sh')}")
    state, rows = read_job(job_dir)
    assert state["status"] == "STOPPED", (state["status"], out)  # not FAILED: the trap saw a clean exit
    assert "Traceback" not in out and "Stopped by user at step" in out, out
    assert saved_after < 1.0  # written within 1 s of the SIGTERM, before anything optional
    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, adapter)
    load_adapter(model, saved_adapter(job_dir, job_id))  # the job's model, as the app lists it
    done = max(r["step"] for r in (json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()))
    assert 0 < done < 20000
