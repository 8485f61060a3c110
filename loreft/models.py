"""Loading a base model: local folders, Hugging Face ids, GGUF files; quantized or not.

Training, eval, generate and serve all load through load_model, so a model name means the same thing
everywhere. A .gguf file is converted once into the cache ($LOREFT_CACHE or ~/.cache/mlx-loreft).
A quantized base stays quantized on Metal and CUDA; on a CPU it is unpacked to dense weights when they
fit (MLX's CPU quantized matmuls do not use the BLAS and train many times slower than dense ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ConfigError

CACHE_ENV = "LOREFT_CACHE"
DEQUANTIZE = ("auto", "always", "never")
DENSE_SHARE_OF_MEMORY = 0.5  # 'auto' unpacks when the dense weights take at most this share of free memory


def cache_root() -> Path:
    """Where converted and built models are kept: $LOREFT_CACHE, else ~/.cache/mlx-loreft."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mlx-loreft").expanduser()


def converted_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The mlx-lm folder for a GGUF file, converted on first use (key: the file's path, size and mtime, and the
    importer's FORMAT_VERSION, so a changed importer converts again)."""
    from . import gguf

    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{gguf.FORMAT_VERSION}"
    folder = Path(cache_dir or cache_root()) / f"gguf-{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (folder / "config.json").is_file():
        gguf.convert(path, folder)
    return folder


def check_model(name: str) -> dict | None:
    """Fail early, with one line, for a model that cannot be loaded: a missing folder or .gguf file, a folder
    without a readable config.json, a GGUF file the importer cannot convert. Returns the model's config
    (for a .gguf file, the one its conversion writes; None for a Hugging Face id not in the local cache)."""
    path = Path(os.path.expanduser(name))
    if path.suffix.lower() == ".gguf":
        from . import gguf

        if not path.is_file():
            raise ConfigError("model", name, "no such GGUF file")
        metadata, tensors = gguf.read_header(path)
        gguf.check_supported(path, metadata, tensors)
        return gguf.model_config(metadata, tensors)
    if not path.exists():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ConfigError("model", name, "no such folder, and not a Hugging Face model id") from None
        if str(name).startswith((".", "/", "~")) or name.count("/") != 1:
            raise ConfigError("model", name, "no such folder, and not in the Hugging Face cache")
        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            return None  # mlx_lm.load may still download it
        path = Path(cached).parent
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ConfigError("model", name, "is not an mlx-lm model folder (no config.json in it)")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("model", name, f"{config} is not UTF-8 text; the model folder is damaged") from None
    except json.JSONDecodeError as e:
        raise ConfigError("model", name, f"{config} line {e.lineno}: not valid JSON ({e.msg}); the model folder "
                                         "is damaged") from None


def model_shape(config: dict | None) -> tuple[int, int] | None:
    """(hidden size, layers) from a model's config.json, or None when it does not say."""
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    hidden = config.get("hidden_size", text.get("hidden_size"))
    layers = config.get("num_hidden_layers", text.get("num_hidden_layers"))
    return (hidden, layers) if isinstance(hidden, int) and isinstance(layers, int) else None


def resolve_model(name: str) -> str:
    """A .gguf file -> its converted folder; an existing local folder -> its absolute path; else a Hugging Face id."""
    path = Path(os.path.expanduser(name))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError("model", name, "no such GGUF file")
        return str(converted_gguf(path))
    return str(path.resolve()) if path.exists() else name


def quantized_layers(model) -> list:
    """The model's quantized modules (QuantizedLinear, QuantizedEmbedding, ...)."""
    return [m for _, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")]


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux: MemAvailable; elsewhere: physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_dequantize(model, setting: str, dtype) -> tuple[bool, str]:
    """(unpack?, why): 'auto' unpacks on a CPU when the dense weights fit in half the free memory."""
    import mlx.core as mx

    from .model import count_parameters

    if setting not in DEQUANTIZE:
        raise ConfigError("dequantize", setting, f"choose one of {', '.join(DEQUANTIZE)}")
    if not quantized_layers(model):
        return False, "not quantized"
    if setting != "auto":
        return setting == "always", f"dequantize={setting}"
    if mx.default_device() != mx.cpu:
        return False, "the GPU's quantized kernels are fast"
    dense = count_parameters(model) * dtype.size
    free = available_memory()
    fits = dense <= DENSE_SHARE_OF_MEMORY * free
    return fits, (f"on a CPU, dense weights ({dense / 2**30:.2f} GiB) "
                  f"{'fit in' if fits else 'exceed'} half the free memory ({free / 2**30:.1f} GiB)")


def dequantize(model) -> None:
    """Replace every quantized layer by its dense equivalent, in the dtype of its scales."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)


def load_model(name: str, dtype: str = "auto", dequantize_base: str = "auto", log=None):
    """(model, tokenizer): mlx_lm.load the base, cast its floating weights to dtype, unpack it if the rule says so.

    name: a local mlx-lm folder, a Hugging Face id in the local cache, or a .gguf file.
    dequantize_base: 'auto' (on a CPU when it fits in memory), 'always' or 'never'.
    """
    import mlx.core as mx
    import mlx_lm

    from .trainer import resolve_dtype

    check_model(name)
    folder = resolve_model(name)  # a .gguf file is converted here (once)
    try:
        model, tokenizer = mlx_lm.load(folder)
    except Exception as e:  # truncated weights, a missing tokenizer, not cached and no network, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if Path(os.path.expanduser(name)).exists() else " (not in the Hugging Face cache, and not downloaded)"
        raise ConfigError("model", name, f"could not be loaded{where}: {type(e).__name__}: {detail}") from e
    target = resolve_dtype(dtype)
    # cast first: the quantized scales and biases then unpack in the target dtype, not in float16
    model.set_dtype(target, lambda x: mx.issubdtype(x, mx.floating))
    unpack, why = should_dequantize(model, dequantize_base, target)
    if unpack:
        layers = quantized_layers(model)
        dequantize(model)
        mx.eval(model.parameters())
        if log:
            dtype_name = str(target).rsplit(".", 1)[-1]
            log(f"Unpacked {len(layers)} quantized layers to dense {dtype_name} ({why}; --dequantize never "
                "keeps them quantized)")
    return model, tokenizer
