"""Process-wide MLX settings for speed, applied by an explicit call: `loreft.backend.setup()`.

Importing loreft changes nothing in the process. The `loreft` command, main.py (TransformerLab) and the
benchmarks call setup() before they import mlx.core; a program that uses loreft as a library can do
the same, first thing:

    import loreft.backend
    loreft.backend.setup()   # before `import mlx.core` (and before any loreft module that uses MLX)
"""

from __future__ import annotations

_applied: dict | None = None  # what the first call did: later calls return it and change nothing


def setup() -> dict:
    """Fast BLAS on Linux CPUs, then the CUDA graph size and a lasting kernel cache on NVIDIA GPUs; returns what was applied.

    Call it before mlx.core is first imported: libmlx binds its BLAS when it loads, so a later call
    cannot change it (it warns when that costs speed). Calling again returns the first call's result.
    """
    global _applied
    if _applied is not None:
        return _applied
    from .blas import enable_fast_blas

    fast_blas = enable_fast_blas()  # warns if mlx.core came first and a faster BLAS was available
    from .cuda import default_kernel_cache, tune_cuda_graphs  # imports mlx.core: after the BLAS

    _applied = {"fast_blas": fast_blas, "cuda_graphs_tuned": tune_cuda_graphs(), "kernel_cache": default_kernel_cache()}
    return _applied
