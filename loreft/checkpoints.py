"""Checkpoints: an adapter plus optimizer state and progress, for an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from .adapter import AdapterError, read_weights, save_adapter
from .model import Reft

CHECKPOINTS = "checkpoints"  # the folder under the adapter folder
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"  # the best adapter's weights so far (best_metric), so a resumed run keeps it


def checkpoint_folder(adapter_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` steps goes."""
    return Path(adapter_dir) / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(reft: Reft, optimizer: optim.Optimizer, folder: Path, step: int, trainer_state: dict,
                    best_weights: dict | None = None, **adapter_kw) -> Path:
    """A complete adapter plus optimizer state, progress and the best weights so far, written atomically."""
    opt_state = dict(tree_flatten(optimizer.state))
    mx.eval(opt_state)

    def extras(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt_state)
        if best_weights is not None:
            mx.save_safetensors(str(tmp / BEST_FILE), {k: v.astype(mx.float32) for k, v in best_weights.items()})
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}))

    return save_adapter(reft, folder, write_extras=extras, **adapter_kw)


def latest_checkpoint(adapter_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under adapter_dir/checkpoints, or None."""
    folder = Path(adapter_dir) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(reft: Reft, optimizer: optim.Optimizer, folder: str | Path) -> dict:
    """Restore intervention weights and optimizer state from a checkpoint; returns its trainer state.

    The state's "best_weights" holds the best weights so far, where the checkpoint has them.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint ({STATE_FILE} is missing)")
    try:
        reft.load_parameters(read_weights(folder))
    except AdapterError:
        raise
    except ValueError as e:  # names or shapes of another run's interventions
        raise AdapterError(f"checkpoint {folder} does not fit this run's interventions: {e}") from None
    saved = read_weights(folder, OPTIMIZER_FILE)
    optimizer.init(reft.model.trainable_parameters())
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in saved]
    if missing:
        raise AdapterError(f"checkpoint {folder} does not match this run's optimizer (missing {missing[:3]})")
    optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
    state = json.loads((folder / STATE_FILE).read_text())
    if (folder / BEST_FILE).is_file():
        state["best_weights"] = read_weights(folder, BEST_FILE)
    return state
