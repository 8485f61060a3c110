"""MLX CUDA backend settings that let the host queue a training step further ahead of the GPU (applied by backend.setup)."""

from __future__ import annotations

import os

import mlx.core as mx

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
