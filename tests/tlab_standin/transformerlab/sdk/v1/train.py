"""STAND-IN for TransformerLab's plugin SDK `transformerlab.sdk.v1.train` (tests only; not TransformerLab's code).

Written against the `transformerlab` package (`lab`) 0.0.45, which the archived server pins and installs in
every plugin's venv, following the documented contract of the plugin-era SDK:
- importing it imports `transformerlab.plugin` (the workspace and temp folders, asked of `lab` at import).
- `tlab_trainer.params`: a dict with attribute access (missing keys read as None), filled from the
  command line (--input_file, --job_id, ...) and from the input file's "config" (values the command
  line did not set).
- The job is `lab.Job(job_id)` (synchronous in 0.0.x): <workspace>/jobs/<job_id>/index.json =
  {"id", "status", "progress", "job_data"}, with the workspace from $TFL_WORKSPACE_DIR.
- progress_update(percent) writes progress; when job_data["stop"] is true it sets status STOPPED and
  raises KeyboardInterrupt("Job stopped by user").
- log_metric(name, value, step) keeps the latest value of each metric in <output_dir>/metrics.json
  (the real SDK also writes TensorBoard / W&B; here every call is appended to
  <output_dir>/metrics_history.jsonl instead, so tests can read the series).
- load_dataset(types): <workspace>/datasets/<dataset_name>/ (its .json/.jsonl/.csv files, all in one
  train split) or a Hugging Face id; with no validation split, 80/20 of train.
- job_wrapper(...): marks start and progress_start, runs the function, then progress_update(progress_end)
  (which raises KeyboardInterrupt after a Stop) and completion_status "success"; on an Exception it prints
  it with its traceback, marks completion_status "failed" (with a generic completion_details, as the real
  SDK writes) and re-raises. KeyboardInterrupt is not an Exception: it passes through unrecorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import traceback
from pathlib import Path

import transformerlab.plugin  # noqa: F401  (as the real SDK: fails at import under transformerlab 0.1.x)
from lab import Job


class DotDict(dict):
    """A dict whose keys read as attributes (None when missing)."""

    __getattr__ = dict.get
    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class TrainerTLabPlugin:
    """The stand-in `tlab_trainer`."""

    def __init__(self):
        self.params = DotDict()
        self._parsed = False
        self._job = None
        self._metrics: dict = {}

    # -- arguments and config
    def _ensure_args_parsed(self) -> None:
        if self._parsed:
            return
        parser = argparse.ArgumentParser()
        for flag in ("--job_id", "--dataset_name", "--model_name", "--input_file", "--experiment_name"):
            parser.add_argument(flag, default=None)
        args, _ = parser.parse_known_args()
        self.params.update(vars(args))
        if self.params.input_file:
            loaded = json.loads(Path(self.params.input_file).read_text())
            config = loaded.get("config", loaded)
            self.params._config = config
            for key, value in config.items():
                if self.params.get(key) is None:
                    self.params[key] = value
        self._parsed = True

    @property
    def job(self) -> Job:
        if self._job is None:
            self._ensure_args_parsed()
            self._job = Job(self.params.job_id)
        return self._job

    # -- reporting
    def add_job_data(self, key, value) -> None:
        self.job.update_job_data_field(key, value)

    def progress_update(self, progress) -> None:
        self.job.update_progress(progress)
        if self.job.get_job_data().get("stop", False):
            self.job.update_status("STOPPED")
            raise KeyboardInterrupt("Job stopped by user")

    def log_metric(self, metric_name: str, metric_value: float, step: int | None = None) -> None:
        self._metrics[metric_name] = metric_value
        out = Path(self.params.get("output_dir") or "")
        if not self.params.get("output_dir") or not out.is_dir():
            print(f"Output directory not found or not specified: {out}")
            return
        (out / "metrics.json").write_text(json.dumps(self._metrics, indent=2))
        with open(out / "metrics_history.jsonl", "a") as f:
            f.write(json.dumps({"name": metric_name, "value": metric_value, "step": step}) + "\n")

    # -- data
    def load_dataset(self, dataset_types=("train",)) -> dict:
        import datasets

        self._ensure_args_parsed()
        name = self.params.dataset_name
        if not name:
            self.add_job_data("completion_status", "failed")
            self.add_job_data("completion_details", "Dataset name not provided")
            raise ValueError("Dataset name not provided")
        folder = Path(os.environ["TFL_WORKSPACE_DIR"]) / "datasets" / str(name)
        if folder.is_dir():
            files = sorted(str(p) for p in folder.iterdir()
                           if p.suffix in (".json", ".jsonl", ".csv") and p.name != "index.json")
            builder = "csv" if files and files[0].endswith(".csv") else "json"

            def load(split):
                return datasets.load_dataset(builder, data_files={"train": files}, split=split)
            available = ["train"]
        else:
            available = datasets.get_dataset_split_names(name)

            def load(split):
                return datasets.load_dataset(name, split=split)
        splits = {t: t for t in dataset_types}
        if "valid" in splits:
            if "validation" in available:
                splits["valid"] = "validation"
            elif "valid" not in available:
                splits["valid"], splits["train"] = "train[-20%:]", "train[:80%]"
        return {t: load(s) for t, s in splits.items()}

    # -- the job around the training function
    def job_wrapper(self, progress_start: int = 0, progress_end: int = 100, wandb_project_name: str = "TLab_Training",
                    manual_logging: bool = False):
        def decorator(func):
            @functools.wraps(func)
            def wrapper(*args, **kwargs):
                self._ensure_args_parsed()
                self.add_job_data("start_time", _now())
                self.add_job_data("model_name", self.params.model_name)
                self.add_job_data("template_name", self.params.template_name)
                self.progress_update(progress_start)
                try:
                    result = func(*args, **kwargs)
                    self.progress_update(progress_end)
                    self.add_job_data("completion_status", "success")
                    self.add_job_data("completion_details", "Job completed successfully")
                    self.add_job_data("end_time", _now())
                    return result
                except Exception as e:
                    print(f"Error in Job: {e}\n{traceback.format_exc()}")
                    self.add_job_data("completion_status", "failed")
                    self.add_job_data("completion_details", "Error occurred while executing job")
                    self.add_job_data("end_time", _now())
                    raise

            return wrapper

        return decorator


tlab_trainer = TrainerTLabPlugin()
