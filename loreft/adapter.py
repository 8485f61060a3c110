"""Adapter folders: reft_config.json + adapter.safetensors, written atomically, rebuilt exactly."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import __version__
from .config import ReftConfig
from .interventions import PYREFT_NAMES
from .model import Reft, attach, model_dims

CONFIG_FILE = "reft_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "mlx-loreft-adapter"
FORMAT_VERSION = 2  # 2: the ReftConfig is under "config" (version 1 called it "reft_config"; still read)


def adapter_metadata(reft: Reft, base_model: str | None = None, extra: dict | None = None) -> dict:
    """Everything needed to rebuild the interventions exactly, plus provenance."""
    cfg = reft.config
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": cfg.to_dict(),
        "intervention_class": PYREFT_NAMES[cfg.intervention],
        "layers": reft.layers,
        "groups": reft.groups,
        "hidden_size": reft.hidden_size,
        "num_layers": reft.num_layers,
        "rank": cfg.rank,
        "act_fn": cfg.act_fn,
        "dropout": cfg.dropout,
        "weights_dtype": "float32",
        "rotation": "stored unconstrained; R = Gram-Schmidt(rotation), applied twice",
        "base_model": base_model,
        "model_type": getattr(getattr(reft.model, "args", None), "model_type", None),
    }
    meta.update(extra or {})
    return meta


def atomic_folder(path: str | Path, write: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Path:
    """Run write(tmp) on a fresh sibling folder, then swap it in for path: readers never see half a folder.

    Entries named in keep (e.g. a checkpoints folder) move from the old folder into the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for name in keep:
            if (path / name).exists() and not (tmp / name).exists():
                os.replace(path / name, tmp / name)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous adapter back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_adapter(
    reft: Reft,
    path: str | Path,
    base_model: str | None = None,
    extra: dict | None = None,
    write_extras: Callable[[Path], None] | None = None,
    keep: tuple[str, ...] = (),
) -> Path:
    """Write the adapter folder atomically; write_extras(tmp_folder) may add files (metrics, plots)."""
    weights = {k: v.astype(mx.float32) for k, v in reft.parameters().items()}
    mx.eval(weights)
    meta = adapter_metadata(reft, base_model, extra)

    def write(folder: Path) -> None:
        mx.save_safetensors(str(folder / WEIGHTS_FILE), weights, metadata={"format": FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if write_extras is not None:
            write_extras(folder)

    return atomic_folder(path, write, keep)


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's reft_config.json, with a clear error when the folder is not an adapter."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a ReFT adapter folder: {CONFIG_FILE} is missing")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not an {FORMAT} file (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {meta['format_version']}; this library reads up to {FORMAT_VERSION}")
    return meta


def load_adapter(model: nn.Module, path: str | Path) -> Reft:
    """Attach the adapter's interventions to a freshly loaded base model and load its weights exactly."""
    meta = read_adapter_config(path)
    hidden, num_layers = model_dims(model)
    if (hidden, num_layers) != (meta["hidden_size"], meta["num_layers"]):
        raise ValueError(
            f"adapter {path} was trained on a model with hidden size {meta['hidden_size']} and "
            f"{meta['num_layers']} layers (base model {meta.get('base_model')!r}); this model has "
            f"hidden size {hidden} and {num_layers} layers"
        )
    config = ReftConfig.from_dict(meta["config"] if "config" in meta else meta["reft_config"])
    reft = attach(model, config)
    reft.load_parameters(mx.load(str(Path(path) / WEIGHTS_FILE)))
    return reft
