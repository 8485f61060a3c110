"""One training job from flat parameters (CLI flags, YAML, TransformerLab): validate, load, train.

PARAMETERS is the single table of every user-facing parameter: its type, default, bounds and help.
The CLI's flags, the plugin's index.json form, task.yaml and README's table are generated from it
(tools/make_plugin_files.py, which also writes info.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (ACTIVATIONS, BEST_METRICS, DTYPES, INTERVENTIONS, LIMITS, LR_SCHEDULES, PRESETS, TRUNCATION,
                     ConfigError, ReftConfig, TrainConfig, check_choice, check_number)
from .models import (DEQUANTIZE, check_model, load_model, model_shape,  # noqa: F401  (re-exported: the loader lives in models.py)
                     resolve_model)


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple | None = None
    group: str = "job"  # "job", "reft" or "train": which config the value lands in

    def __post_init__(self):
        if self.name in LIMITS and self.minimum is None and self.maximum is None:  # config.LIMITS is their home
            object.__setattr__(self, "minimum", LIMITS[self.name][0])
            object.__setattr__(self, "maximum", LIMITS[self.name][1])


REPORT_TO = ("none", "tensorboard", "wandb", "tensorboard,wandb")  # loggers besides the app's own
REFT_DEFAULTS, TRAIN_DEFAULTS = ReftConfig(), TrainConfig()  # the defaults PARAMETERS shows

PARAMETERS: list[Param] = [
    Param("model", str, None, "Base model: a local mlx-lm model folder, a .gguf file (llama family, converted once into the cache) or a Hugging Face id already in the local cache."),
    Param("data", str, None, "Dataset: a .jsonl/.json/.csv/.parquet file, a folder of splits, or a Hugging Face dataset id."),
    Param("adapter_dir", str, "adapters/loreft", "Folder the adapter is written to (atomically)."),
    Param("preset", str, "", "Paper settings to start from; explicit parameters override them.", enum=("",) + tuple(PRESETS)),
    Param("prompt_template", str, "", "Jinja2 template of the prompt over the row's columns, e.g. '{{instruction}}'. Empty: auto-detect."),
    Param("completion_template", str, "", "Jinja2 template of the completion, e.g. '{{output}}'. Empty: auto-detect."),
    Param("chat_column", str, "", "Column holding chat messages; the last assistant turn is the completion."),
    Param("resume", str, "", "Resume from a checkpoint folder, or 'auto' for the newest under adapter_dir/checkpoints."),
    Param("overwrite", bool, False, "Replace adapter_dir even when it holds files this project did not write."),
    Param("intervention", str, REFT_DEFAULTS.intervention, "ReFT intervention type: loreft is the paper's LoReFT.", enum=INTERVENTIONS, group="reft"),
    Param("layers", str, REFT_DEFAULTS.layers, "Layers to intervene on: 'all', 'middle', '3;9;18;24' or a range '0-11'.", group="reft"),
    Param("positions", str, REFT_DEFAULTS.positions, "Prompt positions edited: 'f7+l7' = first 7 and last 7 prompt tokens; 'l1' = the last one.", group="reft"),
    Param("rank", int, REFT_DEFAULTS.rank, "Rank r of the low-rank subspace (parameters grow linearly with r).", group="reft"),
    Param("share_weights", bool, REFT_DEFAULTS.share_weights, "One intervention per layer for both first and last positions (tied).", group="reft"),
    Param("dropout", float, REFT_DEFAULTS.dropout, "Dropout on the edited hidden states (pyreft's default 0).", group="reft"),
    Param("act_fn", str, REFT_DEFAULTS.act_fn, "Activation applied to W h + b.", enum=ACTIVATIONS, group="reft"),
    Param("learning_rate", float, TRAIN_DEFAULTS.learning_rate, "Peak learning rate (> 0).", group="train"),
    Param("lr_schedule", str, TRAIN_DEFAULTS.lr_schedule, "Decay after warmup.", enum=LR_SCHEDULES, group="train"),
    Param("warmup_ratio", float, TRAIN_DEFAULTS.warmup_ratio, "Share of the updates spent warming up linearly.", group="train"),
    Param("weight_decay", float, TRAIN_DEFAULTS.weight_decay, "AdamW weight decay (0 uses Adam).", group="train"),
    Param("batch_size", int, TRAIN_DEFAULTS.batch_size, "Examples per batch.", group="train"),
    Param("grad_accumulation_steps", int, TRAIN_DEFAULTS.grad_accumulation_steps, "Batches per optimizer update (its gradient is the token mean over all of them, as one large batch).", group="train"),
    Param("epochs", int, TRAIN_DEFAULTS.epochs, "Passes over the training split (ignored when iters > 0).", group="train"),
    Param("iters", int, TRAIN_DEFAULTS.iters, "Total batches to train on; 0 uses epochs.", group="train"),
    Param("max_seq_length", int, TRAIN_DEFAULTS.max_seq_length, "Longest prompt + completion in tokens.", group="train"),
    Param("truncation", str, TRAIN_DEFAULTS.truncation, "Rows too long: 'left' cuts the prompt's start, 'drop' skips them.", enum=TRUNCATION, group="train"),
    Param("grad_clip", float, TRAIN_DEFAULTS.grad_clip, "Clip the gradient's global norm to this (0: off).", group="train"),
    Param("steps_per_report", int, TRAIN_DEFAULTS.steps_per_report, "Report loss, tokens/s and progress every N steps.", group="train"),
    Param("steps_per_eval", int, TRAIN_DEFAULTS.steps_per_eval, "Validate every N steps (0: only at the end).", group="train"),
    Param("save_every", int, TRAIN_DEFAULTS.save_every, "Write a checkpoint every N steps (0: only the final adapter); a step is one batch, so N must be a multiple of grad_accumulation_steps.", group="train"),
    Param("max_eval_batches", int, TRAIN_DEFAULTS.max_eval_batches, "Cap on validation batches (0: the whole split).", group="train"),
    Param("valid_fraction", float, TRAIN_DEFAULTS.valid_fraction, "Share of train held out when the data has no validation split.", group="train"),
    Param("seed", int, TRAIN_DEFAULTS.seed, "Seed for initialization, shuffling, splits and dropout.", group="train"),
    Param("grad_checkpoint", bool, TRAIN_DEFAULTS.grad_checkpoint, "Recompute the blocks' activations in the backward pass instead of keeping them: less memory for long sequences, slower steps.", group="train"),
    Param("dtype", str, TRAIN_DEFAULTS.dtype, "Base model dtype; 'auto' = bfloat16 on a GPU, float32 on a CPU.", enum=DTYPES, group="train"),
    Param("dequantize", str, "auto", "Quantized base: unpack to dense weights first. 'auto' = on a CPU when the dense weights take at most half the free memory (CPU quantized matmuls are slow); GPUs keep the quantized kernels.", enum=DEQUANTIZE),
    Param("best_metric", str, TRAIN_DEFAULTS.best_metric, "The adapter saved is the best one by this evaluation (test_exact_match: greedy generation on the test split at every evaluation); the last one is kept as a checkpoint. 'last': save the last one.", enum=BEST_METRICS, group="train"),
    Param("early_stopping_patience", int, TRAIN_DEFAULTS.early_stopping_patience, "Stop after this many evaluations without improvement of best_metric (0: off); the best adapter is saved.", group="train"),
    Param("early_stopping_min_delta", float, TRAIN_DEFAULTS.early_stopping_min_delta, "The smallest change of best_metric that counts as an improvement for early stopping.", group="train"),
    Param("report_to", str, "none", "Also log metrics to TensorBoard (event files under adapter_dir/runs), W&B (offline without an API key), or both.", enum=REPORT_TO, group="job"),
]
PARAMS_BY_NAME = {p.name: p for p in PARAMETERS}

# Form titles where name.title() reads badly (the plugin's form and task.yaml).
TITLES = {
    "lr_schedule": "Learning Rate Schedule", "act_fn": "Activation Function", "dtype": "Base Model Dtype",
    "max_seq_length": "Max Sequence Length", "iters": "Iterations (0: use epochs)", "grad_clip": "Gradient Clipping",
    "grad_accumulation_steps": "Gradient Accumulation Steps", "max_eval_batches": "Max Validation Batches",
    "steps_per_eval": "Steps per Validation", "steps_per_report": "Steps per Report", "save_every": "Checkpoint Every N Steps",
    "share_weights": "Tie First/Last Interventions", "valid_fraction": "Validation Fraction",
    "resume": "Resume From Checkpoint", "preset": "Paper Preset", "best_metric": "Keep the Best Adapter By",
    "early_stopping_min_delta": "Early Stopping Min Delta", "report_to": "Report To",
    "dequantize": "Unpack a Quantized Base",
}
# TransformerLab's defaults where they differ from PARAMETERS': checkpoints on (the app's Resume starts
# from them), and in task.yaml a first run of minutes, not hours.
APP_OVERRIDES = {"save_every": 100}
TASK_OVERRIDES = {**APP_OVERRIDES, "iters": 300, "steps_per_eval": 100, "max_eval_batches": 8}


def coerce(param: Param, value: Any) -> Any:
    """Turn a value that may arrive as a string (TransformerLab sends strings) into the parameter's type."""
    if value is None:
        return None
    kind = param.type
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            value = int(number)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError, OverflowError):
        pass  # not a number at all: check_number below names the rule
    # the table's bounds and finiteness, for every front end (flags, YAML, TransformerLab)
    return check_number(param.name, value, param.minimum, param.maximum, integer=kind is int)


@dataclass
class Job:
    """A fully validated training job."""

    model: str
    data: str | None
    adapter_dir: str
    reft: ReftConfig
    train: TrainConfig
    formatting: dict = field(default_factory=dict)
    resume: str | None = None
    preset: str = ""
    report_to: tuple[str, ...] = ()  # metric loggers besides the caller's callbacks: "tensorboard", "wandb"
    overwrite: bool = False  # replace adapter_dir even when it holds files this project did not write
    dequantize: str = "auto"  # a quantized base: 'auto', 'always' or 'never' unpack it (models.should_dequantize)

    def to_params(self) -> dict:
        """The flat parameters this job was made from (after defaults and preset)."""
        flat = {"model": self.model, "data": self.data, "adapter_dir": self.adapter_dir, "preset": self.preset,
                "report_to": ",".join(self.report_to) or "none", "overwrite": self.overwrite,
                "dequantize": self.dequantize,
                "resume": self.resume or "", **self.formatting}
        flat.update({k: v for k, v in self.reft.to_dict().items() if k != "seed"})
        flat.update(self.train.to_dict())
        return flat


def job_from_params(params: dict, *, strict: bool = True, require_data: bool = True) -> Job:
    """Validate flat parameters into a Job; every error names the parameter, its value and what is allowed.

    strict: unknown keys are an error (CLI, YAML); TransformerLab passes extra keys, so it uses strict=False.
    """
    unknown = sorted(k for k in params if k not in PARAMS_BY_NAME)
    if strict and unknown:
        raise ConfigError(unknown[0], params[unknown[0]], f"unknown parameter; known: {', '.join(PARAMS_BY_NAME)}")
    values = {p.name: p.default for p in PARAMETERS}
    given = {k: coerce(PARAMS_BY_NAME[k], v) for k, v in params.items() if k in PARAMS_BY_NAME and v is not None}
    preset = given.get("preset", "") or ""
    if preset and preset not in PRESETS:
        raise ConfigError("preset", preset, f"choose one of {', '.join(PRESETS)}")
    for group in ("reft", "train"):
        values.update(PRESETS.get(preset, {}).get(group, {}))
    values.update(given)
    for p in PARAMETERS:
        if p.enum is not None:
            check_choice(p.name, values[p.name], p.enum)
    if not values["model"]:
        raise ConfigError("model", values["model"], "give a local model folder or a Hugging Face model id")
    if require_data and not values["data"]:
        raise ConfigError("data", values["data"], "give a dataset file, folder or Hugging Face dataset id")
    reft = ReftConfig(**{f.name: values[f.name] for f in dataclasses.fields(ReftConfig) if f.name != "seed"},
                      seed=values["seed"]).validate()
    train = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)}).validate()
    formatting = {k: values[k] or None for k in ("prompt_template", "completion_template", "chat_column")}
    resume = values["resume"] or None
    return Job(values["model"], values["data"], values["adapter_dir"], reft, train, formatting, resume, preset,
               report_to=parse_report_to(values["report_to"]), overwrite=values["overwrite"],
               dequantize=values["dequantize"])


def parse_report_to(text: str) -> tuple[str, ...]:
    """'none' -> (); 'tensorboard,wandb' -> ('tensorboard', 'wandb') (the value is one of REPORT_TO)."""
    return () if text == "none" else tuple(text.split(","))


def dtype_name(dtype: str) -> str:
    """The dtype a run really uses ('auto' resolved), as a name: recorded in training_args.json."""
    from .trainer import resolve_dtype

    return next(name for name in DTYPES if name != "auto" and resolve_dtype(name) == resolve_dtype(dtype))


def resolve_resume(job: Job) -> str | None:
    """The checkpoint folder to resume from (the newest one for 'auto'), checked against the job before the model loads."""
    from .adapter import AdapterError, read_adapter_config
    from .config import parse_layers
    from .checkpoints import STATE_FILE, latest_checkpoint

    if not job.resume:
        return None
    folder = latest_checkpoint(job.adapter_dir) if job.resume == "auto" else Path(job.resume).expanduser()
    if folder is None:
        return None
    allowed = "give a checkpoint folder (adapter_dir/checkpoints/step-N) or 'auto'"
    if not folder.is_dir():
        raise ConfigError("resume", job.resume, f"no such folder; {allowed}")
    if not (folder / STATE_FILE).is_file():
        raise ConfigError("resume", job.resume, f"not a training checkpoint ({STATE_FILE} is missing); {allowed}")
    try:
        meta = read_adapter_config(folder)
    except AdapterError as e:
        raise ConfigError("resume", str(folder), str(e)) from None
    saved, mine = meta["config"], job.reft.to_dict()
    differ = [f"{k}={saved.get(k)!r} there, {mine[k]!r} here" for k in
              ("intervention", "rank", "positions", "share_weights", "act_fn") if saved.get(k) != mine[k]]
    try:
        layers = parse_layers(job.reft.layers, meta["num_layers"])
    except ConfigError:
        layers = None
    if layers != meta.get("layers"):
        differ.append(f"layers={meta.get('layers')} there, {job.reft.layers!r} here")
    if meta.get("base_model") and resolve_model(str(meta["base_model"])) != resolve_model(job.model):
        differ.append(f"base model {meta['base_model']} there, {job.model} here")
    try:
        step = json.loads((folder / STATE_FILE).read_text())["step"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("resume", str(folder), f"{STATE_FILE} is damaged ({e}); resume from an earlier checkpoint") from None
    if job.train.iters and step >= job.train.iters:
        differ.append(f"it is at step {step}, this run has iters={job.train.iters}")
    if differ:
        raise ConfigError("resume", str(folder), f"the checkpoint is another run's ({'; '.join(differ)}); resume with "
                                                 "its settings, or start fresh without resume")
    return str(folder)


def run_job(job: Job, callbacks=(), splits: dict | None = None, log=print) -> dict:
    """Load data and model, attach the interventions, train, save; returns the trainer's summary.

    splits: already-loaded {split: rows} (TransformerLab's loader); otherwise job.data is loaded.
    Data and templates are checked before the model loads, so bad input fails fast.
    """
    from .adapter import check_adapter_dir
    from .data import DataError, Formatter, column_names, load_splits, pad_id_for, tokenize_rows
    from .model import attach
    from .reporting import report_callbacks
    from .trainer import check_selection, train

    import mlx.core as mx

    group = mx.distributed.init()  # the processes training together (one, unless under mlx.launch)
    main_process = group.rank() == 0
    if not main_process:
        log = lambda *args, **kwargs: None  # noqa: E731  (one voice under mlx.launch: rank 0's)
    # everything that can fail without the model fails first: the output folder, the model's path, resume, the data
    if main_process:  # only rank 0 writes the adapter; the others may not share its disk
        note = check_adapter_dir(job.adapter_dir, job.overwrite, protect=(job.model, job.data if splits is None else None))
        if note:
            log(note)
    check_model(job.model)
    resume = resolve_resume(job) if main_process else None  # rank 0 loads the checkpoint and shares it
    if job.resume == "auto":
        log(f"Resuming from {resume}" if resume else "No checkpoint found; starting fresh")
    sources: dict = {}
    if splits is None:
        splits = load_splits(job.data, valid_fraction=job.train.valid_fraction, seed=job.train.seed, sources=sources)
    formatter = Formatter(None, **job.formatting)
    columns = column_names(splits["train"])
    try:
        formatter.check(columns)
    except DataError as e:  # name the data it is about
        origin = sources["train"].path if "train" in sources and sources["train"].path else job.data or "the dataset"
        raise DataError(f"{origin}: {e}") from None
    check_selection(job.train, splits.get("valid"), splits.get("test"), group.size() == 1)
    if main_process:  # one logger per run, on the process that reports
        callbacks = [*callbacks, *report_callbacks(job.report_to, job.adapter_dir, config=job.to_params())]
    model, tokenizer = load_model(job.model, job.train.dtype, job.dequantize, log=log)
    formatter.tokenizer = tokenizer
    formatter.check(columns)  # again, now that the chat template is known
    reft = attach(model, job.reft)  # checks layers and rank against the model before any tokenizing
    examples = {}
    for name, rows in splits.items():
        examples[name], stats = tokenize_rows(rows, formatter, tokenizer, job.train.max_seq_length, job.train.truncation,
                                              split=name, source=sources.get(name))
        if stats["truncated"] or stats["dropped"]:
            log(f"{name}: {stats['truncated']} rows truncated, {stats['dropped']} dropped (max_seq_length={job.train.max_seq_length})")
    # what training really used (auto-detection may have chosen a template), so generation formats alike
    extra = {"formatting": {"prompt_template": formatter.prompt_template, "completion_template": formatter.completion_template,
                            "chat_column": formatter.chat_column, "chat": formatter.uses_chat_template}}
    test_metrics_fn = None
    if group.size() == 1:  # greedy generation for exact match runs on one process only
        from .evaluate import exact_match_scores

        def test_metrics_fn(test_examples):
            return exact_match_scores(model, tokenizer, reft, test_examples, batch_size=job.train.batch_size)[0]

    train_config = dataclasses.replace(job.train, dtype=dtype_name(job.train.dtype))  # recorded as really used
    summary = train(
        reft, examples["train"], examples.get("valid"), train_config, job.adapter_dir,
        callbacks=callbacks, test_set=examples.get("test"), pad_id=pad_id_for(tokenizer),
        resume_from=resume, base_model=job.model, adapter_extra=extra, test_metrics_fn=test_metrics_fn, group=group,
    )
    if summary["test"] and group.rank() == 0:
        from .evaluate import write_eval

        write_eval(summary["adapter"], {"split": "test", **summary["test"]})
    return summary
