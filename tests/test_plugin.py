"""The TransformerLab plugin: index.json generated and valid, parameters read = declared, and main.py run the
way the app runs it (its harness imports main and calls main()) against the stand-in SDK in tests/tlab_standin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    detect_runtime,
    job_params,
    split_formatting_template,
)

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "tlab_standin"
sys.path.insert(0, str(ROOT / "tools"))
import make_plugin_files

FORMAT = "Q: {{instruction}}\nA: {{output}}"


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
    config = Recording({k: str(v) if not isinstance(v, str) else v for k, v in values.items()})
    config.update(model_name="some/model", adaptor_output_dir="/tmp/x/adaptors/some/ad", adaptor_name="ad",
                  job_id="1", output_dir="/tmp/x", formatting_template="", log_to_wandb=False)
    job = job_from_params(job_params(config, task=False), strict=False, require_data=False)
    got = job.to_params()
    for name, value in values.items():
        assert got[name] == PARAMS_BY_NAME[name].type(value), f"{name} did not reach the job"
    assert job.model == "some/model" and job.adapter_dir == "/tmp/x/adaptors/some/ad"
    declared = {p.name for p in FORM_PARAMETERS} | set(EXTRA_FIELDS) | set(PLUGIN_CONFIG_KEYS)
    assert config.read <= declared, f"read but not declared: {config.read - declared}"
    # log_to_wandb is read by tlab_trainer's job_wrapper (its W&B setup), not by loreft
    assert {p.name for p in FORM_PARAMETERS} <= config.read


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


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "workspace"
    (ws / "datasets" / "emoji").mkdir(parents=True)
    (ws / "datasets" / "emoji" / "emoji.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    (ws / "experiments" / "alpha" / "tensorboards").mkdir(parents=True)
    return ws


def start(ws: Path, model: Path, job_id: str, **params) -> tuple[subprocess.Popen, dict]:
    """Start the harness as the app does: input file, then plugin_harness.py --plugin_dir --input_file."""
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
    (ws / "temp").mkdir(exist_ok=True)
    input_file = ws / "temp" / f"plugin_input_{job_id}.json"
    input_file.write_text(json.dumps({"experiment": {"name": "alpha", "id": 1}, "config": config}))
    env = {**os.environ, "TFL_WORKSPACE_DIR": str(ws), "PYTHONPATH": str(STANDIN)}
    cmd = [sys.executable, str(STANDIN / "plugin_harness.py"), "--plugin_dir", str(ROOT),
           "--input_file", str(input_file), "--experiment_name", "alpha"]
    proc = subprocess.Popen(cmd, env=env, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, config


def job_state(ws: Path, job_id: str) -> dict:
    return json.loads((ws / "jobs" / job_id / "index.json").read_text())


def test_harness_trains_once_reports_and_saves(workspace, tiny_model_dir):
    proc, config = start(workspace, tiny_model_dir, "11")
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
    assert "estimated_time_remaining" in data

    adapter = Path(config["adaptor_output_dir"])
    meta = read_adapter_config(adapter)
    assert (meta["rank"], meta["layers"], meta["config"]["positions"]) == (2, [0, 2], "f2+l2")
    assert meta["formatting"]["prompt_template"] == "Q: {{instruction}}\nA: "
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = load_adapter(model, adapter)
    assert data["trainable_parameters"] == reft.stats().trainable == 2 * 2 * (2 * 2 * 64 + 2)


def test_stop_saves_the_adapter_and_ends_the_job(workspace, tiny_model_dir):
    proc, config = start(workspace, tiny_model_dir, "12", iters=20000, steps_per_eval=0)
    history = Path(config["output_dir"]) / "metrics_history.jsonl"
    deadline = time.monotonic() + 60
    while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    job_file = workspace / "jobs" / "12" / "index.json"
    # the app's Stop: set job_data.stop (retried: the plugin rewrites the same file without locking)
    while proc.poll() is None and time.monotonic() < deadline:
        state = json.loads(job_file.read_text())
        if not state["job_data"].get("stop"):
            state["job_data"]["stop"] = True
            tmp = job_file.with_suffix(".test")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, job_file)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Job stopped by user" in out, out  # the interrupt ends the job
    state = job_state(workspace, "12")
    assert state["status"] == "STOPPED" and state["job_data"].get("completion_status") != "success"
    adapter = Path(config["adaptor_output_dir"])
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    done = max(r["step"] for r in rows)
    assert 0 < done < 20000
    assert "Stopped by user at step" in state["job_data"]["completion_details"]
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model_dir))
    load_adapter(model, adapter)  # the adapter trained so far is complete and loads


def test_bad_parameter_fails_the_job_naming_it(workspace, tmp_path):
    proc, config = start(workspace, tmp_path / "no-such-model", "13", rank="-3")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    data = job_state(workspace, "13")["job_data"]
    assert data["completion_status"] == "failed"
    assert "rank=-3" in data["error_msg"] and "rank=-3" in out
    assert not Path(config["adaptor_output_dir"]).exists()
