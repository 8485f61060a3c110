"""mlx-loreft: Representation Finetuning (LoReFT and the ReFT family) for mlx-lm models.

Importing the package loads nothing else: the names below load their module (and MLX) on first use,
so that a program can call loreft.backend.setup() before MLX is imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_adapter": "adapter", "read_adapter_config": "adapter", "save_adapter": "adapter",
    "ConfigError": "config", "ReftConfig": "config", "TrainConfig": "config",
    "INTERVENTION_CLASSES": "interventions", "orthonormalize": "interventions",
    "Reft": "model", "attach": "model",
    "Locations": "positions", "prompt_locations": "positions",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loreft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
