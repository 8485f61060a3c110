"""Process-wide MLX settings for speed, applied by an explicit call: `loreft.backend.setup()`.

Importing loreft changes nothing in the process. The `loreft` command, main.py (TransformerLab) and the
benchmarks call setup() before they import mlx.core; a program that uses loreft as a library can do
the same, first thing:

    import loreft.backend
    loreft.backend.setup()   # before `import mlx.core` (and before any loreft module that uses MLX)
"""

from __future__ import annotations

import os
from pathlib import Path

_applied: dict | None = None  # what the first call did: later calls return it and change nothing

# MLX runs a graph's operations in breadth-first order, but at most MLX_BFS_MAX_WIDTH (20) arrays wide, and
# lets only 10 run ahead of the one it waits for. A CPU training step splits its rows over two streams, each
# on a thread of its own (trainer.row_shards): at width 20 the order is one stream's chain, then the other's,
# and only one thread works at a time; unbounded, the two chains interleave and both cores work.
CPU_GRAPH_WIDTH = "1000000"


def kernel_cache_root() -> Path:
    """Where compiled-kernel caches live: $LOREFT_CACHE, else $XDG_CACHE_HOME/mlx-loreft or ~/.cache/mlx-loreft."""
    root = os.environ.get("LOREFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "mlx-loreft"
    return Path(root).expanduser()


def setup() -> dict:
    """Fast BLAS, vectorized fused kernels and interleaved streams on Linux CPUs; the CUDA graph size and a lasting kernel cache on NVIDIA GPUs.

    Returns what was applied.

    Call it before mlx.core is first imported: libmlx binds its BLAS when it loads, so a later call
    cannot change it (it warns when that costs speed). Calling again returns the first call's result.
    """
    global _applied
    if _applied is not None:
        return _applied
    from .blas import enable_fast_blas

    fast_blas = enable_fast_blas()  # warns if mlx.core came first and a faster BLAS was available
    import mlx.core as mx  # after the BLAS

    from . import cpu_kernels
    from .cuda import default_kernel_cache, tune_cuda_graphs

    _applied = {"fast_blas": fast_blas, "cpu_kernels": cpu_kernels.enable(mx.__version__),
                "cuda_graphs_tuned": tune_cuda_graphs(), "kernel_cache": default_kernel_cache(),
                "cpu_streams_interleaved": interleave_cpu_streams(mx)}
    return _applied


def graph_order_unbounded() -> bool:
    """Whether MLX's graph order lets the work of several CPU streams run at once (setup() or the user unbounded it)."""
    try:
        return int(os.environ.get("MLX_BFS_MAX_WIDTH") or 20) >= int(CPU_GRAPH_WIDTH)
    except ValueError:
        return False


def interleave_cpu_streams(mx) -> bool:
    """Unbound MLX's breadth-first graph order (read when MLX first evaluates) on a CPU; True if this set it."""
    if os.environ.get("MLX_BFS_MAX_WIDTH") or mx.default_device() != mx.cpu:
        return False
    os.environ["MLX_BFS_MAX_WIDTH"] = CPU_GRAPH_WIDTH
    return True
