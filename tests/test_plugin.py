"""The TransformerLab plugin: index.json generated and valid, parameters read = declared, setup.sh run the way the
archived server installs a plugin (into a venv that already holds its transformerlab==0.0.45), and main.py run
the way it runs one (its harness imports main and calls main()) in that venv, against the stand-in SDK in
tests/tlab_standin (written against 0.0.45's `lab`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from loreft import load_adapter, read_adapter_config
from loreft.config import ConfigError
from loreft.demo import DEMO_ROWS
from loreft.job import PARAMS_BY_NAME, job_from_params
from loreft.transformerlab import (
    EXTRA_FIELDS,
    FORM_PARAMETERS,
    MODEL_ARCHITECTURES,
    PLUGIN_CONFIG_KEYS,
    app_config,
    detect_runtime,
    job_params,
    split_formatting_template,
)

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "tlab_standin"
sys.path.insert(0, str(ROOT / "tools"))
import make_plugin_files

FORMAT = "Q: {{instruction}}\nA: {{output}}"
ARCHIVED_SERVER_PIN = "0.0.45"  # transformerlab-api's requirements: transformerlab==0.0.45


# ---------------------------------------------------------------------------------------------------
# index.json


def test_generated_files_are_current():
    """index.json, task.yaml and README.md's parameter section are what the tool generates from PARAMETERS."""
    expected = make_plugin_files.outputs()
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.name} is stale: run python tools/make_plugin_files.py"
    index = json.loads((ROOT / "index.json").read_text())
    assert set(index["parameters"]) == {p.name for p in FORM_PARAMETERS} | set(EXTRA_FIELDS)
    assert make_plugin_files.main(["--check"]) == 0


JSON_TYPES = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_index_json_follows_the_rules_the_app_relies_on():
    index = json.loads((ROOT / "index.json").read_text())
    assert index["uniqueId"] == "mlx_loreft_trainer" and index["type"] == "trainer"
    assert index["plugin-format"] == "python" and index["name"] == "Apple MLX LoReFT Trainer"
    assert set(index["supported_hardware_architectures"]) <= {"cpu", "cuda", "mlx", "amd"}
    assert {"chat_template_formatting", "checkpoints", "sweeps"} <= set(index["supports"])
    assert "MLX" in index["model_architectures"] and "LlamaForCausalLM" in index["model_architectures"]
    assert (ROOT / index["setup-script"]).is_file()
    assert all((ROOT / f).is_file() for f in index["files"]), "index.json lists a file that does not exist"
    assert isinstance(index["training_data_instructions"], str) and index["training_data_instructions"]
    assert set(index["parameters_ui"]) == set(index["parameters"])
    for name, field in index["parameters"].items():
        assert name.isidentifier()
        assert set(field) <= {"title", "type", "default", "minimum", "maximum", "enum", "required"}, name
        assert isinstance(field["title"], str) and field["title"]
        fits = JSON_TYPES[field["type"]]
        assert fits(field["default"]), f"{name}: default {field['default']!r} is not a {field['type']}"
        if "minimum" in field:
            assert fits(field["minimum"]) and field["default"] >= field["minimum"], name
        if "maximum" in field:
            assert fits(field["maximum"]) and field["default"] <= field["maximum"], name
        if "enum" in field:
            assert field["default"] in field["enum"] and all(fits(v) for v in field["enum"]), name
        assert field.get("required", True) is True
        help_text = index["parameters_ui"][name].get("ui:help")
        assert isinstance(help_text, str) and len(help_text) > 10, f"{name} has no ui:help"


def test_architectures_are_the_families_attach_is_tested_on():
    from test_model import FAMILIES

    assert set(MODEL_ARCHITECTURES.values()) <= set(FAMILIES)
    index = json.loads((ROOT / "index.json").read_text())
    assert index["model_architectures"] == list(MODEL_ARCHITECTURES) + ["MLX"]


# ---------------------------------------------------------------------------------------------------
# Parameter mapping


class Recording(dict):
    """A config that records every key read from it."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


# a valid value different from the default for every field whose type alone cannot suggest one
NON_DEFAULT_TEXT = {"layers": "0;1", "positions": "f2+l3", "prompt_template": "Q: {{instruction}}\nA: ",
                    "completion_template": "{{output}}", "chat_column": "", "resume": "auto"}


def non_default(p):
    if p.name == "save_every":
        return 4  # a multiple of grad_accumulation_steps' non-default 2, as save_every must be
    if p.name in NON_DEFAULT_TEXT:
        return NON_DEFAULT_TEXT[p.name]
    if p.enum is not None:
        return next(v for v in p.enum if v != p.default)
    if p.type is bool:
        return not p.default
    if p.type is int:
        return p.default + 1 if p.maximum is None or p.default + 1 <= p.maximum else p.default - 1
    if p.type is float:
        return min(p.default + 0.05, p.maximum) if p.maximum is not None else p.default * 2 + 0.01
    raise AssertionError(f"no non-default value for {p.name}")


def test_every_declared_parameter_is_read_and_every_read_is_declared():
    """Each form field reaches the Job (sent as strings, as the app sends them); nothing undeclared is read."""
    values = {p.name: non_default(p) for p in FORM_PARAMETERS if p.name not in ("preset", "chat_column")}
    sent = {k: str(v) if not isinstance(v, str) else v for k, v in values.items()}
    sent.update(model_name="some/model", adaptor_output_dir="/tmp/x/adaptors/some/ad", adaptor_name="ad",
                job_id="1", output_dir="/tmp/x", formatting_template="", log_to_wandb=False, template_name="t",
                plugin_name="mlx_loreft_trainer", model_architecture="LlamaForCausalLM", dataset_name="d",
                formatting_chat_template="", chatml_formatted_column="", run_sweeps=False)
    plain, notes = app_config(sent, task=False)
    assert notes == []  # every key of the app's input file is known: no warning
    config = Recording(plain)
    job = job_from_params(job_params(config, task=False), strict=False, require_data=False)
    got = job.to_params()
    for name, value in values.items():
        assert got[name] == PARAMS_BY_NAME[name].type(value), f"{name} did not reach the job"
    assert job.model == "some/model" and job.adapter_dir == "/tmp/x/adaptors/some/ad"
    declared = {p.name for p in FORM_PARAMETERS} | set(EXTRA_FIELDS) | set(PLUGIN_CONFIG_KEYS)
    assert config.read <= declared, f"read but not declared: {config.read - declared}"
    # log_to_wandb is read by tlab_trainer's job_wrapper (its W&B setup), not by loreft
    assert {p.name for p in FORM_PARAMETERS} <= config.read


def test_other_trainers_names_schema_values_and_unknown_names():
    """num_train_epochs and the like (the app's MLX LoRA trainer) are read as ours; a schema dict gives its default;
    a name nobody reads is warned about, by name."""
    config, notes = app_config({"model_name": "m", "num_train_epochs": "3", "iters": 300, "lora_rank": "16",
                                "rank": 4, "learning_rate_schedule": "cosine", "lora_alpha": 32,
                                "batch_size": {"type": "int", "default": 6, "min": 1}}, task=False)
    job = job_from_params(job_params(config, task=False), strict=False, require_data=False)
    assert (job.train.epochs, job.train.iters, job.reft.rank, job.train.lr_schedule) == (3, 0, 16, "cosine")
    assert job.train.batch_size == 6
    warning = [n for n in notes if n.startswith("Warning")]
    assert len(warning) == 1 and "lora_alpha" in warning[0] and "num_train_epochs" not in warning[0]
    assert any("num_train_epochs='3' read as epochs" in n for n in notes)
    # -1 is the LoRA trainer's "use iters": it changes nothing
    config, notes = app_config({"model_name": "m", "num_train_epochs": -1, "iters": 7}, task=False)
    job = job_from_params(job_params(config, task=False), strict=False, require_data=False)
    assert (job.train.iters, job.train.epochs) == (7, PARAMS_BY_NAME["epochs"].default) and notes == []


def test_preset_applies_to_fields_the_form_left_at_their_defaults():
    form = {p.name: p.default for p in FORM_PARAMETERS}
    job = job_from_params(job_params({**form, "preset": "persona", "model_name": "m"}, task=False),
                          strict=False, require_data=False)
    assert (job.reft.positions, job.reft.layers, job.train.epochs) == ("l1", "middle", 100)
    job = job_from_params(job_params({**form, "preset": "persona", "positions": "f1", "model_name": "m"}, task=False),
                          strict=False, require_data=False)
    assert job.reft.positions == "f1"  # a field the user changed still wins


def test_formatting_template_split_and_chat_mapping():
    assert split_formatting_template("### Q: {{ instruction }}\n### A:\n{{output}}\n") == ("### Q: {{ instruction }}\n### A:\n", "{{output}}")
    for bad in ("{{instruction}} is the answer", "{{output}}", "{% if x %}{{a}}"):
        with pytest.raises(ConfigError) as e:
            split_formatting_template(bad)
        assert e.value.field == "formatting_template"
    chat = job_params({"model_name": "m", "formatting_chat_template": "{{...}}", "chatml_formatted_column": "conv",
                       "formatting_template": FORMAT}, task=False)
    assert chat["chat_column"] == "conv" and "prompt_template" not in chat
    own = job_params({"model_name": "m", "formatting_template": FORMAT, "prompt_template": "{{instruction}}"}, task=False)
    assert own["prompt_template"] == "{{instruction}}" and "completion_template" not in own
    with pytest.raises(ConfigError) as e:
        job_params({"model_name": ""}, task=False)
    assert e.value.field == "model_name"


def test_detect_runtime():
    assert detect_runtime(["--plugin_dir", "p", "--input_file", "f.json"], {}) == "plugin"
    assert detect_runtime([], {"_TFL_JOB_ID": "3"}) == "task"
    assert detect_runtime(["--model", "m"], {"TFL_WORKSPACE_DIR": "/w"}) == "cli"
    assert detect_runtime([], {}) == "cli"


# ---------------------------------------------------------------------------------------------------
# The harness run


def _checked_wheel_dir() -> Path:
    """Where ./bootstrap.sh put the archived server's transformerlab wheel (so no test needs the network)."""
    wheels = Path(sys.prefix) / "wheels"
    if not list(wheels.glob(f"transformerlab-{ARCHIVED_SERVER_PIN}-*.whl")):
        message = f"no transformerlab {ARCHIVED_SERVER_PIN} wheel in {wheels}: run ./bootstrap.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return wheels


def overlay_venv(venv: Path) -> Path:
    """A new venv that sees this test venv's packages (a .pth file; its own ones come first); returns its python.

    Installing torch, transformers and the rest again, as the app's sync does, would take minutes and the network.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """A plugin installed as the archived server installs it: the folder copied to <workspace>/plugins/<id>/, a
    venv there holding the app's transformerlab==0.0.45 (its other packages are this test venv's, seen through a
    .pth file instead of installed again), then `bash setup.sh` with the venv active and no package index."""
    wheels = _checked_wheel_dir()
    home = tmp_path_factory.mktemp("tfl_home")
    plugin = home / "workspace" / "plugins" / "mlx_loreft_trainer"
    index = json.loads((ROOT / "index.json").read_text())
    for name in index["files"] + ["index.json"]:
        (plugin / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, plugin / name)
    venv = plugin / "venv"
    python = overlay_venv(venv)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
                    str(wheels), f"transformerlab=={ARCHIVED_SERVER_PIN}"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("_TFL_SOURCE_CODE_DIR", "PYTHONPATH")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PIP_NO_INDEX="1",
               TFL_HOME_DIR=str(home), TFL_WORKSPACE_DIR=str(home / "workspace"))
    tic = time.perf_counter()
    setup = subprocess.run(["bash", "setup.sh"], cwd=plugin, env=env, capture_output=True, text=True, timeout=300)
    return {"python": python, "plugin": plugin, "env": env, "setup": setup, "setup_s": time.perf_counter() - tic}


def test_setup_keeps_the_apps_transformerlab_and_builds_nothing(plugin_env):
    setup = plugin_env["setup"]
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"Keeping the app's transformerlab {ARCHIVED_SERVER_PIN}" in setup.stdout
    python, plugin, env = plugin_env["python"], plugin_env["plugin"], plugin_env["env"]
    probe = ("import importlib.metadata as m, lab, loreft; "
             "print(m.version('transformerlab')); print(lab.__file__); print(loreft.__file__)")
    out = subprocess.run([str(python), "-c", probe], cwd="/", env=env, capture_output=True, text=True, check=True).stdout
    version, lab_file, loreft_file = out.splitlines()[-3:]  # lab prints its home folder first
    assert version == ARCHIVED_SERVER_PIN and lab_file.startswith(str(plugin / "venv"))
    assert Path(loreft_file).parent == plugin / "loreft"  # the plugin folder itself, with no build step
    command = subprocess.run([str(plugin / "venv" / "bin" / "loreft"), "train", "--help"], cwd="/", env=env,
                             capture_output=True, text=True)
    assert command.returncode == 0 and "--learning-rate" in command.stdout
    print(f"setup.sh in plugin mode took {plugin_env['setup_s']:.1f}s")


def test_standin_sdk_fails_under_transformerlab_0_1_as_the_real_one_does(tmp_path):
    """Why setup.sh must keep 0.0.45: the SDK asks `lab` for the workspace at import, a coroutine in 0.1.x."""
    (tmp_path / "ws").mkdir()
    env = {**os.environ, "PYTHONPATH": str(STANDIN), "TFL_HOME_DIR": str(tmp_path), "TFL_WORKSPACE_DIR": str(tmp_path / "ws")}
    probe = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; assert m.version('transformerlab') >= '0.1';"
                            "import transformerlab.sdk.v1.train"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "coroutine" in probe.stderr


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "workspace"
    (ws / "datasets" / "emoji").mkdir(parents=True)
    (ws / "datasets" / "emoji" / "emoji.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    (ws / "experiments" / "alpha" / "tensorboards").mkdir(parents=True)
    return ws


def start(env: dict, ws: Path, model: Path, job_id: str, **params) -> tuple[subprocess.Popen, dict]:
    """Start a job as the app does: the job's index.json, the input file, then plugin_harness.py in the plugin's venv."""
    config = {
        "job_id": job_id, "template_name": "t", "plugin_name": "mlx_loreft_trainer", "model_name": str(model),
        "model_architecture": "LlamaForCausalLM", "dataset_name": "emoji", "adaptor_name": "ad",
        "adaptor_output_dir": str(ws / "adaptors" / "tiny" / f"ad{job_id}"),
        "output_dir": str(ws / "experiments" / "alpha" / "tensorboards"),
        "formatting_template": FORMAT, "formatting_chat_template": "", "chatml_formatted_column": "",
        "run_sweeps": False, "log_to_wandb": False,
        # the form's fields arrive as strings
        "rank": "2", "layers": "0;2", "positions": "f2+l2", "batch_size": "2", "iters": "12", "learning_rate": "0.01",
        "steps_per_report": "3", "steps_per_eval": "6", "save_every": "0", "share_weights": "false",
    }
    config.update({k: str(v) for k, v in params.items()})
    job_dir = ws / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "index.json").write_text(json.dumps({"id": job_id, "experiment_id": "", "status": "RUNNING",
                                                    "progress": 0, "job_data": {}}))
    (ws / "temp").mkdir(exist_ok=True)
    input_file = ws / "temp" / f"plugin_input_{job_id}.json"
    input_file.write_text(json.dumps({"experiment": {"name": "alpha", "id": 1}, "config": config}))
    run_env = {**env["env"], "TFL_HOME_DIR": str(ws.parent), "TFL_WORKSPACE_DIR": str(ws), "PYTHONPATH": str(STANDIN)}
    cmd = [str(env["python"]), str(STANDIN / "plugin_harness.py"), "--plugin_dir", str(env["plugin"]),
           "--input_file", str(input_file), "--experiment_name", "alpha"]
    proc = subprocess.Popen(cmd, env=run_env, cwd=env["plugin"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, config


def job_state(ws: Path, job_id: str) -> dict:
    return json.loads((ws / "jobs" / job_id / "index.json").read_text())


def test_harness_trains_once_reports_and_saves(plugin_env, workspace, tiny_model_dir):
    proc, config = start(plugin_env, workspace, tiny_model_dir, "11")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.count("Trainable parameters:") == 1  # imported once, trained once
    state = job_state(workspace, "11")
    data = state["job_data"]
    assert state["progress"] == 100 and data["completion_status"] == "success"
    history = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics_history.jsonl").read_text().splitlines()]
    steps = {name: [r["step"] for r in history if r["name"] == name] for name in {r["name"] for r in history}}
    for name in ("train/loss", "train/learning_rate", "train/tokens_per_sec"):
        assert steps[name] == [3, 6, 9, 12], name
    assert steps["eval/loss"] == [6, 12] and steps["eval/perplexity"] == [6, 12]
    # a line in the job's output at every report, and the time left 0 at the end
    lines = [line for line in out.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert [line.split("/")[0] for line in lines] == ["step 3", "step 6", "step 9", "step 12"]
    assert all(" loss " in line and " lr " in line and "ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0s") and data["estimated_time_remaining"] == 0

    adapter = Path(config["adaptor_output_dir"])
    meta = read_adapter_config(adapter)
    assert (meta["rank"], meta["layers"], meta["config"]["positions"]) == (2, [0, 2], "f2+l2")
    assert meta["formatting"]["prompt_template"] == "Q: {{instruction}}\nA: "
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = load_adapter(model, adapter)
    assert data["trainable_parameters"] == reft.stats().trainable == 2 * 2 * (2 * 2 * 64 + 2)


def test_stop_saves_the_adapter_and_ends_the_job(plugin_env, workspace, tiny_model_dir):
    proc, config = start(plugin_env, workspace, tiny_model_dir, "12", iters=20000, steps_per_eval=0)
    history = Path(config["output_dir"]) / "metrics_history.jsonl"
    deadline = time.monotonic() + 60
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    job_file = workspace / "jobs" / "12" / "index.json"
    # the app's Stop: set job_data.stop (retried: lab 0.0.45 rewrites the same file in place, without a lock)
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = json.loads(job_file.read_text())
        except ValueError:  # caught mid-write
            continue
        if not state["job_data"].get("stop"):
            state["job_data"]["stop"] = True
            tmp = job_file.with_suffix(".test")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, job_file)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    state = job_state(workspace, "12")
    assert state["status"] == "STOPPED" and state["job_data"].get("completion_status") != "success"
    assert state["job_data"]["estimated_time_remaining"] == 0
    adapter = Path(config["adaptor_output_dir"])
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    done = max(r["step"] for r in rows)
    assert 0 < done < 20000
    assert "Stopped by user at step" in state["job_data"]["completion_details"]
    assert "Stopped by user at step" in out
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, adapter)  # the adapter trained so far is complete and loads
    assert (adapter / "loss.png").is_file()  # drawn after the adapter was saved


def test_bad_parameter_fails_the_job_naming_it(plugin_env, workspace, tmp_path):
    proc, config = start(plugin_env, workspace, tmp_path / "no-such-model", "13", rank="-3")
    out, _ = proc.communicate(timeout=60)
    data = job_state(workspace, "13")["job_data"]
    assert data["completion_status"] == "failed"
    assert "rank=-3" in data["error_msg"] and "rank=-3" in out
    assert not Path(config["adaptor_output_dir"]).exists()
