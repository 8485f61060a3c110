"""Adapter folders: reft_config.json + adapter.safetensors, written atomically, rebuilt exactly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import __version__
from .config import ConfigError, ReftConfig
from .interventions import PYREFT_NAMES
from .model import Reft, attach, model_dims

CONFIG_FILE = "reft_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "mlx-loreft-adapter"
FORMAT_VERSION = 2  # 2: the ReftConfig is under "config" (version 1 called it "reft_config"; still read)
# What this project writes into an adapter folder (train, eval): a folder holding only these may be replaced.
OWN_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE, "training_args.json", "metrics.jsonl", "loss.png", "eval.json",
                         "checkpoints", "runs"})


class AdapterError(ValueError):
    """A folder cannot be used as an adapter (unreadable, another format, another model's shape)."""


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
    path = Path(path).resolve()  # '.' or 'a/..' name no folder that could be swapped
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; an adapter is an ordinary folder
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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_adapter_dir(path: str | Path, overwrite: bool = False, protect: tuple = ()) -> str | None:
    """Make sure training can write its adapter to path, before anything loads; raise ConfigError if not.

    path is replaced when the run saves, so it must be absent, empty, or a folder this project wrote
    (only OWN_ENTRIES), unless overwrite. Never a folder holding the current directory or a path in
    protect (the data, the model). A file is written and removed in it and beside it (the atomic swap
    writes a sibling); folders made for that test are removed again, so a failed run leaves none behind.
    Returns a note when an earlier adapter will be replaced.
    """
    if not str(path).strip():
        raise ConfigError("adapter_dir", str(path), "give a folder name, e.g. adapters/my-run")
    folder = Path(path).expanduser().resolve()
    for inner in [Path.cwd(), *(Path(p).expanduser().resolve() for p in protect if p)]:
        if inner == folder or folder in inner.parents:
            raise ConfigError("adapter_dir", str(path), f"it holds {inner}, which saving the adapter would replace; "
                                                        "choose a new folder, e.g. adapters/my-run")
    if folder.exists() and not folder.is_dir():
        raise ConfigError("adapter_dir", str(path), "it is a file, not a folder; choose another path")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    foreign = [e for e in entries if e not in OWN_ENTRIES]
    if (folder / CONFIG_FILE).is_file():
        try:
            read_adapter_config(folder)
        except (AdapterError, FileNotFoundError):
            foreign.append(CONFIG_FILE)
    if foreign and not overwrite:
        raise ConfigError("adapter_dir", str(path), f"it holds files this project did not write ({', '.join(foreign[:3])}"
                                                    f"{', ...' if len(foreign) > 3 else ''}), which saving the adapter "
                                                    "would delete; choose another folder, or pass --overwrite "
                                                    "(overwrite: true) to replace it")
    made = [p for p in [folder, *folder.parents] if not p.exists()]  # what the test creates, removed again after it
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for where in (folder, folder.parent):
            tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise ConfigError("adapter_dir", str(path), f"cannot write there ({e.strerror or e})") from None
    finally:
        for p in made:  # deepest first: a failed run leaves no empty folders behind
            with contextlib.suppress(OSError):
                p.rmdir()
    if (folder / CONFIG_FILE).is_file() or (folder / "checkpoints").exists():
        return (f"{path} holds an earlier run's adapter ({', '.join(entries)}); this run replaces all of it "
                "when it saves")
    return None


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
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(f"{file} is not text (not UTF-8); this folder holds no adapter written by loreft") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} line {e.lineno}: not valid JSON ({e.msg}); the adapter folder is damaged, "
                           "train it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterError(f"{file} is not an {FORMAT} file (format={got!r}); this folder holds another kind of adapter")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(f"{file} has format_version {version!r}; this library reads up to {FORMAT_VERSION} "
                           "(upgrade mlx-loreft to read it)")
    if "config" not in meta and "reft_config" in meta:  # format version 1's name for it
        meta["config"] = meta.pop("reft_config")
    missing = [k for k in ("config", "hidden_size", "num_layers") if k not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise AdapterError(f"{file} lacks {', '.join(missing) or 'a valid config'}; the adapter folder is damaged")
    if meta["config"].get("intervention") == "consreft":  # it has no dropout; older files may record one
        meta["config"]["dropout"] = 0.0
    try:
        ReftConfig.from_dict(meta["config"]).validate()
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{file}: its config is invalid ({e})") from None
    return meta


def read_weights(path: str | Path, name: str = WEIGHTS_FILE) -> dict:
    """The adapter's weights (or another safetensors file of the folder), with a clear error when it is missing or damaged."""
    file = Path(path) / name
    if not file.is_file():
        raise AdapterError(f"{file} is missing; the folder is incomplete, train the adapter again")
    try:
        return mx.load(str(file))
    except Exception as e:  # mlx raises RuntimeError / ValueError for a truncated or foreign file
        raise AdapterError(f"{file} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "it is truncated or not a safetensors file, train the adapter again") from None


def load_adapter(model: nn.Module, path: str | Path) -> Reft:
    """Attach the adapter's interventions to a freshly loaded base model and load its weights exactly."""
    meta = read_adapter_config(path)
    weights = read_weights(path)
    hidden, num_layers = model_dims(model)
    if (hidden, num_layers) != (meta["hidden_size"], meta["num_layers"]):
        raise AdapterError(
            f"adapter {path} was trained on a model with hidden size {meta['hidden_size']} and "
            f"{meta['num_layers']} layers (base model {meta.get('base_model')!r}); this model has "
            f"hidden size {hidden} and {num_layers} layers"
        )
    config = ReftConfig.from_dict(meta["config"])
    reft = attach(model, config)
    try:
        reft.load_parameters(weights)
    except ValueError as e:
        raise AdapterError(f"{Path(path) / WEIGHTS_FILE}: {e}") from None
    return reft


def base_model_warning(meta: dict, name: str, path: str | Path) -> str | None:
    """A warning when an adapter is used on another base model than the one it was trained on, else None."""
    trained = meta.get("base_model")
    if not trained or not name:
        return None
    same = lambda a, b: a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()  # noqa: E731
    if same(str(trained), str(name)) or Path(str(trained)).name == Path(str(name)).name:
        return None
    return (f"adapter {path} was trained on {trained}, not {name}: its edits only make sense on the model "
            "it was trained on")
