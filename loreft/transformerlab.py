"""The one place that knows TransformerLab: parameter mapping, the plugin reporter (tlab_trainer), the task reporter (lab).

TransformerLab runs a trainer in two ways: as a plugin, through the SDK its
harness provides (`transformerlab.sdk.v1.train.tlab_trainer`), or as a task, through the `transformerlab`
PyPI package (`from lab import lab`). Both SDKs are imported lazily, inside the functions that use them,
so loreft installs and runs without either.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError
from .job import PARAMETERS, PARAMS_BY_NAME, Job, coerce, job_from_params, run_job
from .reporting import Callback, eval_line, report_line, scalars, start_lines

# Parameters the app itself supplies (model_name, the dataset, adaptor_output_dir): not form fields.
APP_FIELDS = ("model", "data", "adapter_dir")
FORM_PARAMETERS = [p for p in PARAMETERS if p.name not in APP_FIELDS]

# Form fields that are not training parameters (index.json and task.yaml add them to the table's).
ADAPTOR_NAME_DEFAULT = "loreft"
EXTRA_FIELDS: dict[str, dict] = {
    "adaptor_name": {
        "title": "Adaptor Name", "type": "string", "default": ADAPTOR_NAME_DEFAULT, "required": True,
        "ui:help": "Name of the adapter; it is saved under the workspace's adaptors/<model>/<name> folder.",
    },
    "log_to_wandb": {
        "title": "Log to Weights and Biases", "type": "boolean", "default": False,
        "ui:help": "Also send the training metrics to Weights & Biases (needs a W&B API key in the app's settings).",
    },
}

# Keys of the app's own config that job_params may read besides the form's (our own names are accepted too).
PLUGIN_CONFIG_KEYS = ("model_name", "model", "adaptor_output_dir", "formatting_template", "formatting_chat_template",
                      "chatml_formatted_column")
TASK_CONFIG_KEYS = ("model_name", "model", "dataset", "data", "adapter_dir", "formatting_template",
                    "formatting_chat_template", "chatml_formatted_column")
# Keys the apps put into a job's config for their own use (plugin input file; task launch and providers): not warned about.
APP_OWN_KEYS = frozenset({
    "job_id", "template_name", "plugin_name", "model_architecture", "model_path", "model_adapter", "dataset_name",
    "output_dir", "run_sweeps", "sweep_config", "sweep_metric", "lower_is_better", "log_to_wandb", "type",
    "embedding_model", "embedding_model_architecture", "start_time", "_config", "input_file", "experiment_name",
    "docker_image", "region", "fleet_name", "resources", "custom_sbatch_flags",
})
# The names other TransformerLab trainers use for the same settings (the app's MLX LoRA trainer, its HF trainers).
ALIASES = {"num_train_epochs": "epochs", "max_steps": "iters", "lora_rank": "rank", "lora_r": "rank",
           "learning_rate_schedule": "lr_schedule", "gradient_accumulation_steps": "grad_accumulation_steps"}

# The Hugging Face architectures (config.json "architectures") of the mlx-lm families attach() is tested on
# (tests/test_model.py FAMILIES), mapped to their mlx-lm model_type: index.json lists the keys.
MODEL_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
}

REPORT_INTERVAL_S = 1.0  # the app and the trainer rewrite the same job file without locking: report gently


# ---------------------------------------------------------------------------------------------------
# Parameters


def split_formatting_template(template: str) -> tuple[str, str]:
    """TransformerLab's one formatting template -> (prompt template, completion template).

    ReFT edits prompt positions only, so it must know where the completion starts: the completion is
    the template's last {{ expression }}, which must end the template (e.g. '...### Response:\\n{{ output }}').
    """
    from jinja2 import TemplateSyntaxError

    from .data import jinja_env

    m = re.search(r"\{\{[^{}]*\}\}\s*$", template)
    allowed = ("end it with the completion column, e.g. '{{ instruction }}\\n### Response: {{ output }}', "
               "or set prompt_template and completion_template instead")
    if m is None or not template[: m.start()].strip():
        raise ConfigError("formatting_template", template, allowed)
    prompt, completion = template[: m.start()], template[m.start():].rstrip()
    try:
        jinja_env().parse(prompt)
    except TemplateSyntaxError as e:
        raise ConfigError("formatting_template", template, f"its prompt part is not a valid template ({e}); {allowed}") from None
    return prompt, completion


def _given(value: Any, kind: type) -> bool:
    # the app sends every form field, often as strings; an empty number field means "use the default"
    return value is not None and not (kind is not str and isinstance(value, str) and not value.strip())


def plain_value(value: Any) -> Any:
    """A parameter's value: a task parameter may arrive as its schema ({type, default, ...}) when not overridden."""
    if isinstance(value, Mapping) and "default" in value:
        return value["default"]
    return value


def app_config(config: Mapping, *, task: bool) -> tuple[dict, list[str]]:
    """The app's config with schema dicts resolved and other trainers' names mapped to ours; plus notes to show.

    A name used by the app's other trainers (num_train_epochs, lora_rank, ...) wins over the form's own field
    (the form sends every field, so only a deliberate choice brings the other name). num_train_epochs <= 0 is
    the LoRA trainer's "use iters" and is ignored; above 0 it trains whole epochs (iters 0), as that trainer does.
    Names nobody reads are listed in a note, not dropped silently.
    """
    plain = {str(k): plain_value(v) for k, v in config.items()}
    notes = []
    for other, ours in ALIASES.items():
        value = plain.pop(other, None)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if other == "num_train_epochs":
            try:
                use_iters = float(value) <= 0  # unbounded here: epochs' own check names a bad value below
            except (TypeError, ValueError):
                use_iters = False
            if use_iters:
                continue
            plain["iters"] = 0
        plain[ours] = value
        notes.append(f"{other}={value!r} read as {ours}" + (" (iters=0)" if other == "num_train_epochs" else ""))
    known = {p.name for p in PARAMETERS} | set(EXTRA_FIELDS) | APP_OWN_KEYS | set(TASK_CONFIG_KEYS if task else PLUGIN_CONFIG_KEYS)
    unknown = sorted(k for k in plain if k not in known)
    if unknown:
        notes.append(f"Warning: unknown parameters ignored: {', '.join(unknown)} (this trainer's parameters: "
                     f"{', '.join(p.name for p in FORM_PARAMETERS)})")
    return plain, notes


def job_params(config: Mapping, *, task: bool) -> dict:
    """The app's config (a plugin input file's "config", or a task's parameters) -> flat loreft parameters.

    Form fields keep their names. The app's own fields map as: model_name -> model; the task's dataset ->
    data (a plugin's data comes from tlab_trainer.load_dataset instead); adaptor_output_dir (plugin) or
    adaptors/<adaptor_name> (task) -> adapter_dir; formatting_chat_template + chatml_formatted_column ->
    chat_column, or else formatting_template -> prompt_template + completion_template. Explicit
    prompt_template / completion_template / chat_column win over the app's formatting fields. With a
    preset chosen, form fields left at their defaults give way to the preset's values.
    """
    flat = {p.name: config.get(p.name) for p in FORM_PARAMETERS if _given(config.get(p.name), p.type)}
    if flat.get("preset"):
        # the app sends every form field, so a field still at its default was not chosen: let the preset set it
        flat = {k: v for k, v in flat.items() if k == "preset" or coerce(PARAMS_BY_NAME[k], v) != PARAMS_BY_NAME[k].default}
    model = config.get("model_name") or config.get("model")
    if not model:
        raise ConfigError("model_name", model, "choose a base model (a local mlx-lm folder or a Hugging Face id)")
    flat["model"] = str(model)
    name = str(config.get("adaptor_name") or ADAPTOR_NAME_DEFAULT)
    if task:
        data = config.get("dataset") or config.get("data")
        if not data:
            raise ConfigError("dataset", data, "choose a dataset (a local file or folder, or a Hugging Face id)")
        flat["data"] = str(data)
        flat["adapter_dir"] = str(config.get("adapter_dir") or Path("adaptors") / name)
    else:
        flat["adapter_dir"] = str(config.get("adaptor_output_dir") or Path("adaptors") / name)
    if not any(flat.get(k) for k in ("prompt_template", "completion_template", "chat_column")):
        if config.get("formatting_chat_template"):
            flat["chat_column"] = config.get("chatml_formatted_column") or "messages"
        elif config.get("formatting_template"):
            flat["prompt_template"], flat["completion_template"] = split_formatting_template(str(config["formatting_template"]))
    return flat


# ---------------------------------------------------------------------------------------------------
# Reporters


class _Throttle:
    """True at most once per interval (and always when forced)."""

    def __init__(self, interval: float, clock=time.monotonic):
        self.interval, self.clock, self.last = interval, clock, -math.inf

    def __call__(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.interval:
            self.last = now
            return True
        return False


STOPPING_WAIT_S = 1.0  # how long a stopped task job waits for the app's STOPPING before writing STOPPED


def _wait_for_status(job, status: str, timeout: float, poll: float = 0.05) -> bool:
    """Whether the job's status reads `status` within timeout seconds (polled; a read caught mid-write is retried)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        if asyncio.run(job.get_status()) == status:  # JobStatus is a str enum
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def _percent(step: int, total: int) -> int:
    return int(100 * step / max(total, 1))


def _stopped_message(summary: dict) -> str:
    return f"Stopped by user at step {summary['steps']} of {summary['total_steps']}; adapter saved to {summary['adapter']}"


class PluginReporter(Callback):
    """Reports to a plugin job through tlab_trainer; a Stop in the app becomes should_stop()."""

    def __init__(self, tlab, interval: float = REPORT_INTERVAL_S, log=print):
        self.tlab, self.log = tlab, log
        self.throttle = _Throttle(interval)
        self.stopped = False
        self.total = 1
        self.eta_s: float | None = None

    def on_train_start(self, info):
        self.total = info["total_steps"]
        self.tlab.add_job_data("trainable_parameters", int(info["trainable"]))
        self.tlab.add_job_data("trainable_percent", float(info["percent"]))
        for line in start_lines(info):
            self.log(line)

    def on_step(self, step, total_steps):
        if self.stopped or not self.throttle(force=step == total_steps):
            return
        try:
            # the SDK raises KeyboardInterrupt here once the user pressed Stop (and marks the job STOPPED)
            self.tlab.progress_update(_percent(step, total_steps))
            if self.eta_s is not None:
                self.tlab.add_job_data("estimated_time_remaining", round(self.eta_s))
        except KeyboardInterrupt:
            self.stopped = True
            self.log(f"Stop requested at step {step}: saving the adapter trained so far")

    def on_report(self, m):
        self.eta_s = m["eta_s"]
        self.log(report_line(m, self.total))
        for name, value in scalars(m).items():
            self.tlab.log_metric(name, value, m["step"])

    def on_eval(self, m):
        self.log(eval_line(m))
        for name, value in scalars(m).items():
            self.tlab.log_metric(name, value, m["step"])

    def on_end(self, summary):
        self.tlab.add_job_data("estimated_time_remaining", 0)
        if summary["stopped"]:
            self.tlab.add_job_data("completion_details", _stopped_message(summary))

    def should_stop(self):
        return self.stopped


class TaskReporter(Callback):
    """Reports to a task job through `lab`: progress and metrics rows, checkpoints, the app's stop flag.

    After a stop, on_end publishes the adapter as the job's model and marks the job STOPPED before the
    trainer draws anything optional: TransformerLab SIGKILLs a stopped job 3 s after its SIGTERM.
    """

    def __init__(self, lab, interval: float = REPORT_INTERVAL_S, log=None, name: str = ADAPTOR_NAME_DEFAULT,
                 parent_model: str | None = None):
        self.lab = lab
        self.log = log or lab.log
        self.throttle = _Throttle(interval)
        self.total = 1
        self.stop_requested = False
        self.name, self.parent_model = name, parent_model
        self.saved: str | None = None  # the job's copy of the adapter (lab.save_model)

    def on_train_start(self, info):
        self.total = info["total_steps"]
        self.lab.set_job_data_field("trainable_parameters", int(info["trainable"]))
        self.lab.set_job_data_field("trainable_percent", float(info["percent"]))
        for line in start_lines(info):
            self.log(line)

    def on_step(self, step, total_steps):
        if not self.stop_requested and self.throttle():
            # the app's Stop writes job_data["stop"] = true (and SIGTERMs the process tree on local providers)
            self.stop_requested = bool(self.lab.get_job_data().get("stop"))

    def on_report(self, m):
        # one write of the job's index.json per report: lab rewrites it whole, without a lock, and so does
        # the app (its stop flag), so every extra write is a chance to lose the other side's
        self.lab.update_progress(_percent(m["step"], self.total), metrics=scalars(m), step=m["step"])
        self.log(report_line(m, self.total))

    def on_eval(self, m):
        self.lab.update_progress(_percent(m["step"], self.total), metrics=scalars(m), step=m["step"])
        self.log(eval_line(m))

    def on_checkpoint(self, step, path):
        self.lab.save_checkpoint(str(path), Path(path).name)  # lab.get_checkpoint_to_resume() finds these

    def publish(self, summary: dict) -> None:
        """The adapter as the job's model (lab.save_model); a stopped job marked STOPPED."""
        import asyncio

        from lab import JobStatus

        self.saved = self.lab.save_model(summary["adapter"], name=self.name, architecture="MLX",
                                         pipeline_tag="text-generation", parent_model=self.parent_model)
        self.lab.set_job_data_field("adapter_path", self.saved)
        if summary["stopped"]:
            message = _stopped_message(summary)
            self.lab.set_job_data_field("completion_details", message)
            # the app's Stop writes the flag, then STOPPING: a job that saw the flag between the two would mark
            # itself STOPPED only to have the app's STOPPING land on top, so it waits (briefly) for STOPPING
            _wait_for_status(self.lab.job, JobStatus.STOPPING, STOPPING_WAIT_S)
            asyncio.run(self.lab.job.update_status(JobStatus.STOPPED))
            self.log(message)

    def on_end(self, summary):
        if summary["stopped"]:  # at once; a finished run publishes after run_job wrote its test results
            self.publish(summary)

    def should_stop(self):
        return self.stop_requested


# ---------------------------------------------------------------------------------------------------
# Runtimes


def detect_runtime(argv: list[str] | None = None, environ: Mapping | None = None) -> str:
    """'plugin' (the harness passed --input_file), 'task' (a TransformerLab job is set up) or 'cli'."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    if any(a == "--input_file" or a.startswith("--input_file=") for a in argv):
        return "plugin"
    if environ.get("_TFL_JOB_ID"):
        return "task"
    if not argv and (environ.get("TFL_WORKSPACE_DIR") or environ.get("TFL_HOME_DIR")):
        try:
            import lab  # noqa: F401  (the transformerlab package)
        except ImportError:
            return "cli"
        return "task"
    return "cli"


def describe(job: Job) -> str:
    """One line with every setting of the job (for the job's log)."""
    return "LoReFT job: " + ", ".join(f"{k}={v!r}" for k, v in job.to_params().items())


STOPPED_BY_USER = "Job stopped by user"  # the plugin SDK's KeyboardInterrupt message for the app's Stop


def run_plugin(log=print) -> int:
    """Train once under the plugin harness; returns the exit code (0 also after a Stop, 1 on failure).

    The SDK's job_wrapper records the outcome: a failure re-raises through it (it marks the job failed), and
    after a Stop its final progress_update raises KeyboardInterrupt (the job is already STOPPED): both end
    here, without a traceback, once the adapter trained so far is saved.
    """
    from transformerlab.sdk.v1.train import (
        tlab_trainer,  # provided by the harness, not by PyPI
    )

    from .reporting import StopOnSignal

    stop = StopOnSignal((signal.SIGTERM,), log=log).install()

    @tlab_trainer.job_wrapper(wandb_project_name="TLab_Training", manual_logging=True)
    def train_loreft() -> dict:
        try:
            config, notes = app_config(tlab_trainer.params, task=False)
            for note in notes:
                log(note)
            job = job_from_params(job_params(config, task=False), strict=False, require_data=False)
            log(describe(job))
            splits = tlab_trainer.load_dataset(["train", "valid"])
            tlab_trainer.add_job_data("checkpoints_dir", str(Path(job.adapter_dir) / "checkpoints"))
            reporter = PluginReporter(tlab_trainer, log=log)
            summary = run_job(job, callbacks=[reporter, stop], splits=dict(splits), log=log)
        except Exception as e:
            # the wrapper records a generic failure; the app shows job_data.error_msg to the user
            tlab_trainer.add_job_data("error_msg", f"{type(e).__name__}: {e}")
            log(f"LoReFT training failed: {type(e).__name__}: {e}")
            raise
        log(_stopped_message(summary) if summary["stopped"] else f"Adapter saved to {summary['adapter']}")
        return summary

    try:
        train_loreft()
        return 0
    except KeyboardInterrupt as e:
        if str(e.args[0] if e.args else "") != STOPPED_BY_USER:
            raise  # Ctrl-C in a terminal
        return 0
    except Exception:  # noqa: BLE001  (already recorded in the job and printed by the wrapper)
        return 1
    finally:
        stop.restore()


def _workspace_path(lookup, name: str, usable) -> str:
    """The workspace's folder for a model / dataset id when it holds the files itself (else the id, for the HF cache)."""
    if Path(name).expanduser().exists():
        return name
    try:
        folder = Path(lookup(name))
    except Exception:  # noqa: BLE001  (missing, or any storage error: then it is a Hugging Face id)
        return name
    return str(folder) if folder.is_dir() and usable(folder) else name


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _has_data(folder: Path) -> bool:
    # the app keeps its own index.json beside the uploaded files
    return any(f.is_file() and f.name != "index.json" and not f.name.startswith(".") for f in folder.iterdir())


def run_task(log=print) -> int:
    """Train once as a TransformerLab task; returns the exit code (0 also after a Stop, 1 on failure)."""
    import asyncio

    from .reporting import StopOnSignal

    # From the start: the app's Stop (SIGTERM to every process of the job, then SIGKILL 3 s later) must
    # find the handler in place even while the model loads.
    stop = StopOnSignal((signal.SIGTERM,), log=log).install()
    from lab import lab

    lab.init()

    def tlog(message: str) -> None:  # the job's output file, and stdout (the provider's log)
        print(message, flush=True)
        lab.log(message)

    stop.log = tlog
    try:
        config, notes = app_config(lab.get_config(), task=True)
        for note in notes:
            tlog(note)
        params = job_params(config, task=True)
        job: Job = job_from_params(params, strict=False)
        job.model = _workspace_path(lab.get_model_path, job.model, _has_model)
        job.data = _workspace_path(lambda n: asyncio.run(lab.get_dataset(n).get_dir()), job.data, _has_data)
        checkpoint = lab.get_checkpoint_to_resume()
        if checkpoint:
            job.resume = checkpoint
            tlog(f"Resuming from checkpoint {checkpoint}")
        tlog(describe(job))
        name = str(config.get("adaptor_name") or Path(job.adapter_dir).name)
        reporter = TaskReporter(lab, log=tlog, name=name, parent_model=job.model)
        summary = run_job(job, callbacks=[reporter, stop], log=tlog)
        adapter = summary["adapter"]
        for extra in ("loss.png", "metrics.jsonl"):
            if (Path(adapter) / extra).is_file():
                lab.save_artifact(str(Path(adapter) / extra), extra)
        if summary["stopped"]:
            return 0  # published in on_end
        reporter.publish(summary)
        score = {}
        for split in ("valid", "test"):  # the score's keys are the metrics' own names: a sweep ranks by them
            if summary.get(split):
                score.update(scalars({"kind": "eval", "split": split, **summary[split]}))
        lab.update_progress(100)
        lab.finish(f"LoReFT adapter trained ({summary['steps']} steps); saved to {reporter.saved}", score=score)
        return 0
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        lab.set_job_data_field("error_msg", message)
        lab.error(message)
        log(f"LoReFT training failed: {message}")
        if isinstance(e, ValueError):  # ConfigError, DataError: the message says it all
            return 1
        raise
    finally:
        stop.restore()
