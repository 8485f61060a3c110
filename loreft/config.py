"""Configuration: ReftConfig (what to attach) and TrainConfig (how to train), parsed and validated."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

INTERVENTIONS = ("loreft", "noreft", "direft", "nodireft", "consreft", "lobireft")
ACTIVATIONS = ("linear", "relu", "gelu", "gelu_approx", "silu", "tanh", "sigmoid")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRUNCATION = ("left", "drop")
# which evaluation picks the adapter that is saved ("last": the adapter after the last step)
BEST_METRICS = ("eval_loss", "eval_perplexity", "test_exact_match", "last")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        super().__init__(f"{field_name}={value!r} is invalid: {allowed}")


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                 integer: bool = False, above: float | None = None) -> int | float:
    """value if it is a finite number (an int when integer) in [minimum, maximum] and > above; else ConfigError."""
    bounds = [f"{op} {x}" for op, x in ((">", above), (">=", minimum), ("<=", maximum)) if x is not None]
    rule = f"must be {'an integer' if integer else 'a finite number'} {' and '.join(bounds)}".rstrip()
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(name, value, rule)
    if (above is not None and value <= above) or (minimum is not None and value < minimum) or \
            (maximum is not None and value > maximum):
        raise ConfigError(name, value, rule)
    return value


# The allowed range of every numeric ReftConfig / TrainConfig field: the one home of these bounds
# (the parameter table, the CLI, YAML, TransformerLab and the library all check them here).
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "rank": (1, 1024),
    "dropout": (0.0, 0.99),
    "seed": (0, None),
    "learning_rate": (1e-8, None),
    "warmup_ratio": (0.0, 1.0),
    "weight_decay": (0.0, None),
    "batch_size": (1, None),
    "grad_accumulation_steps": (1, None),
    "epochs": (0, None),
    "iters": (0, None),
    "max_seq_length": (2, None),
    "grad_clip": (0.0, None),
    "steps_per_report": (1, None),
    "steps_per_eval": (0, None),
    "save_every": (0, None),
    "max_eval_batches": (0, None),
    "valid_fraction": (0.0, 0.9),
    "early_stopping_patience": (0, None),
    "early_stopping_min_delta": (0.0, None),
}


def check_limits(config: Any) -> None:
    """check_number on every field of a config dataclass that LIMITS bounds (an int field must hold an int)."""
    for f in dataclasses.fields(config):
        if f.name in LIMITS:
            check_number(f.name, getattr(config, f.name), *LIMITS[f.name], integer=type(f.default) is int)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """value if it is one of choices; else ConfigError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, value, f"choose one of {', '.join(repr(c) if c == '' else c for c in choices)}")
    return value


def parse_positions(spec: str) -> tuple[int, int]:
    """'f7+l7' -> (7, 7); 'f1' -> (1, 0); 'l3' -> (0, 3)."""
    allowed = "expected 'fN', 'lN' or 'fN+lM' with N, M >= 1 (e.g. 'f7+l7', 'l1')"
    if not isinstance(spec, str):
        raise ConfigError("positions", spec, allowed)
    m = re.fullmatch(r"\s*(?:f(\d+)(?:\s*\+\s*l(\d+))?|l(\d+))\s*", spec.lower())
    if not m:
        raise ConfigError("positions", spec, allowed)
    first, last = int(m.group(1) or 0), int(m.group(2) or m.group(3) or 0)
    if (m.group(1) and first < 1) or ((m.group(2) or m.group(3)) and last < 1):
        raise ConfigError("positions", spec, allowed)
    return first, last


def parse_layers(spec: Any, num_layers: int | None = None) -> list[int] | None:
    """'all', 'middle', '3;9;18', '0-11', '2,4' or a list -> sorted unique layer indices (None: needs the model)."""
    allowed = "expected 'all', 'middle', indices like '3;9;18;24', ranges like '0-11', or a list of ints"
    if isinstance(spec, str) and spec.strip().lower() in ("all", "middle"):
        if num_layers is None:
            return None
        return list(range(num_layers)) if spec.strip().lower() == "all" else [num_layers // 2]
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    layers: list[int] = []
    if isinstance(spec, str):
        parts = [p.strip() for p in re.split(r"[;,\s]+", spec.strip()) if p.strip()]
        if not parts:
            raise ConfigError("layers", spec, allowed)
        for part in parts:
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError("layers", spec, allowed)
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if m.group(2) is not None and hi < lo:
                raise ConfigError("layers", spec, f"range {part!r} ends before it starts")
            layers.extend(range(lo, hi + 1))
    elif isinstance(spec, (list, tuple)) and spec:
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int):
                raise ConfigError("layers", spec, allowed)
            layers.append(x)
    else:
        raise ConfigError("layers", spec, allowed)
    if num_layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError("layers", spec, f"layer {bad[0]} is out of range; the model has layers 0..{num_layers - 1}")
    elif any(i < 0 for i in layers):
        raise ConfigError("layers", spec, "layer indices must be >= 0")
    return sorted(set(layers))


@dataclass
class ReftConfig:
    """Which interventions to attach, where, and of what shape."""

    layers: Any = "all"
    rank: int = 4
    positions: str = "f7+l7"
    intervention: str = "loreft"
    share_weights: bool = False
    dropout: float = 0.0
    act_fn: str = "linear"
    seed: int = 0

    def validate(self, hidden_size: int | None = None, num_layers: int | None = None) -> "ReftConfig":
        """Check every field (against the model's shape when given); raise ConfigError on the first bad one."""
        check_choice("intervention", self.intervention, INTERVENTIONS)
        check_limits(self)
        if hidden_size is not None and self.rank >= hidden_size:
            raise ConfigError("rank", self.rank, f"must be smaller than the model's hidden size {hidden_size}")
        parse_positions(self.positions)
        parse_layers(self.layers, num_layers)
        if not isinstance(self.share_weights, bool):
            raise ConfigError("share_weights", self.share_weights, "must be true or false")
        if self.intervention == "consreft" and self.dropout:
            raise ConfigError("dropout", self.dropout, "consreft has no dropout; set dropout=0 or choose another intervention")
        check_choice("act_fn", self.act_fn, ACTIVATIONS)
        return self

    @property
    def first_last(self) -> tuple[int, int]:
        """The (first_n, last_n) prompt positions."""
        return parse_positions(self.positions)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReftConfig":
        """Build from a dict; unknown keys are an error."""
        return cls(**_known_fields(cls, d, "ReftConfig"))


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batching, evaluation, checkpoints."""

    learning_rate: float = 4e-3
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    epochs: int = 1
    iters: int = 0  # > 0 overrides epochs
    max_seq_length: int = 512
    truncation: str = "left"  # "left": cut the prompt's start; "drop": skip the row
    grad_clip: float = 0.0  # 0: no clipping
    steps_per_report: int = 10
    steps_per_eval: int = 50  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    max_eval_batches: int = 0  # 0: the whole validation split
    seed: int = 0
    dtype: str = "auto"
    valid_fraction: float = 0.2
    best_metric: str = "eval_loss"  # the saved adapter is the best by this; "last": the last one
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: off)
    early_stopping_min_delta: float = 0.0  # the smallest change that counts as an improvement
    grad_checkpoint: bool = False  # recompute each intervened block's activations in the backward pass

    def validate(self) -> "TrainConfig":
        """Check every field; raise ConfigError on the first bad one."""
        check_limits(self)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("truncation", self.truncation, TRUNCATION)
        check_choice("dtype", self.dtype, DTYPES)
        if self.epochs == 0 and self.iters == 0:
            raise ConfigError("epochs", self.epochs, "set epochs >= 1 or iters >= 1")
        check_choice("best_metric", self.best_metric, BEST_METRICS)
        if self.early_stopping_patience and self.best_metric == "last":
            raise ConfigError("best_metric", self.best_metric, "early stopping needs a metric to watch: choose "
                              "eval_loss, eval_perplexity or test_exact_match")
        if not isinstance(self.grad_checkpoint, bool):
            raise ConfigError("grad_checkpoint", self.grad_checkpoint, "must be true or false")
        if self.save_every % self.grad_accumulation_steps:
            # a checkpoint holds no half-accumulated gradient, so it is taken between optimizer updates
            raise ConfigError("save_every", self.save_every, f"must be a multiple of grad_accumulation_steps="
                              f"{self.grad_accumulation_steps}: steps count batches, and checkpoints are taken "
                              "after an optimizer update")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**_known_fields(cls, d, "TrainConfig"))


def _known_fields(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(unknown[0], d[unknown[0]], f"unknown {what} field; known fields: {', '.join(sorted(names))}")
    return dict(d)


# The paper's settings (Wu et al. 2024, its hyperparameter tables), offered by name in the CLI, the plugin form and the task.
PRESETS: dict[str, dict[str, dict]] = {
    "commonsense": {
        "reft": {"layers": "all", "rank": 8, "positions": "f7+l7", "share_weights": True, "dropout": 0.0},
        "train": {"learning_rate": 9e-4, "warmup_ratio": 0.1, "lr_schedule": "linear", "weight_decay": 0.0},
    },
    "instruct": {
        "reft": {"layers": "3;9;18;24", "rank": 4, "positions": "f5+l5", "share_weights": False},
        "train": {"learning_rate": 9e-4, "warmup_ratio": 0.1, "lr_schedule": "linear"},
    },
    "persona": {
        "reft": {"layers": "middle", "rank": 4, "positions": "l1", "share_weights": False},
        "train": {"learning_rate": 4e-3, "epochs": 100, "lr_schedule": "linear", "warmup_ratio": 0.0},
    },
}
