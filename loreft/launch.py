"""Settings for a process that `mlx.launch` started as one of several NCCL ranks (one NVIDIA GPU each)."""

from __future__ import annotations

import os

CUDA_GRAPHS_ENV = "MLX_USE_CUDA_GRAPHS"  # MLX reads it once, at the first GPU kernel of the process


def nccl_ranks() -> int:
    """How many ranks `mlx.launch --backend nccl` started (it sets NCCL_HOST_IP and MLX_WORLD_SIZE); 0 otherwise."""
    if "NCCL_HOST_IP" not in os.environ:
        return 0
    try:
        return int(os.environ.get("MLX_WORLD_SIZE", "1"))
    except ValueError:
        return 0


def plain_streams_for_nccl() -> bool:
    """On several NCCL ranks, run kernels without CUDA graphs unless the user chose; True when they are off.

    MLX captures each collective into the CUDA graph it is building, which then cannot be updated in place;
    on 2x H200 a Qwen2-0.5B training step with its gradient all-reduce took 69.5 ms with graphs and 46 ms
    without (BENCHMARKS.md). One process is faster with graphs, so nothing changes there.
    """
    if nccl_ranks() > 1:
        os.environ.setdefault(CUDA_GRAPHS_ENV, "0")
    return os.environ.get(CUDA_GRAPHS_ENV) == "0"
