"""mlx-loreft: Representation Finetuning (LoReFT and the ReFT family) for mlx-lm models."""

__version__ = "0.1.0"

from .blas import enable_fast_blas  # noqa: E402

FAST_BLAS = enable_fast_blas()  # first: libmlx binds cblas_sgemm when mlx.core is first imported

from .cuda import default_kernel_cache, tune_cuda_graphs  # noqa: E402

CUDA_GRAPHS_TUNED = tune_cuda_graphs()  # before anything runs on the GPU: MLX reads the limits once
KERNEL_CACHE = default_kernel_cache()  # before MLX compiles its first CUDA kernel: it reads the folder once

from .adapter import load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .config import ConfigError, ReftConfig, TrainConfig  # noqa: E402
from .interventions import INTERVENTION_CLASSES, orthonormalize  # noqa: E402
from .model import Reft, attach  # noqa: E402
from .positions import Locations, prompt_locations  # noqa: E402

__all__ = [
    "ConfigError",
    "INTERVENTION_CLASSES",
    "Locations",
    "Reft",
    "ReftConfig",
    "TrainConfig",
    "attach",
    "load_adapter",
    "orthonormalize",
    "prompt_locations",
    "read_adapter_config",
    "save_adapter",
]
