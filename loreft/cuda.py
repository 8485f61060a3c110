"""MLX CUDA backend settings (applied by backend.setup): the CUDA graph size, so the host queues a training step
further ahead of the GPU, and a kernel cache that lasts."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .backend import kernel_cache_root

# MLX sends the GPU its kernels as CUDA graphs of at most MLX_MAX_OPS_PER_BUFFER ops and lets the host run a
# fixed number of graphs ahead. On the GPUs where MLX picks 100 ops (sm_90, sm_100, sm_120 in its table), that
# is a small part of a LoReFT step, so the host keeps waiting for the GPU mid-step. 400 ops: fewer graph
# launches, the same memory (graphs also end at MLX's MLX_MAX_MB_PER_BUFFER, left as it is). The measurements
# are in BENCHMARKS.md (bench/step_timing.py, bench/distributed.py).
GRAPH_OPS = "400"
RAISED_ON = {"sm_90", "sm_100", "sm_120"}


def tune_cuda_graphs() -> bool:
    """Default MLX_MAX_OPS_PER_BUFFER (read once, when MLX first uses the GPU); True if this set it."""
    if "MLX_MAX_OPS_PER_BUFFER" in os.environ or not mx.cuda.is_available():
        return False
    if mx.device_info().get("architecture") not in RAISED_ON:  # properties only: the GPU is not used yet
        return False
    os.environ["MLX_MAX_OPS_PER_BUFFER"] = GRAPH_OPS
    return True


# MLX compiles each distinct CUDA kernel the first time a process needs it (a LoReFT step needs about a hundred:
# minutes on a fresh machine) and keeps the result under MLX_PTX_CACHE_DIR, by default in the system's temp
# folder, which a new container, VM or reboot empties. A folder under the user's cache lasts.
KERNEL_CACHE_ENV = "MLX_PTX_CACHE_DIR"


def kernel_cache_dir() -> Path:
    """The default kernel folder: $LOREFT_CACHE, else $XDG_CACHE_HOME/mlx-loreft or ~/.cache/mlx-loreft, then cuda-kernels/mlx-<version>."""
    return kernel_cache_root() / "cuda-kernels" / f"mlx-{mx.__version__}"  # kernels differ between MLX versions


def default_kernel_cache() -> str | None:
    """Set MLX_PTX_CACHE_DIR to kernel_cache_dir() unless the user set it (read when MLX first compiles a kernel).

    Returns the folder set, or None (not CUDA, or already set). MLX creates the folder; if it cannot, it
    compiles without a cache, as before.
    """
    if KERNEL_CACHE_ENV in os.environ or not mx.cuda.is_available():
        return None
    path = str(kernel_cache_dir())
    os.environ[KERNEL_CACHE_ENV] = path
    return path
