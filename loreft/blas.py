"""Fast float32 matmul for MLX on Linux CPUs: load Intel MKL's BLAS before mlx.core is imported (backend.setup).

The mlx-cpu wheel links netlib's reference BLAS, which is slow (BENCHMARKS.md has the figures). libmlx
looks cblas_sgemm up in the process's global symbol scope when it is loaded, so a library that
exports the same unprefixed CBLAS/LAPACK names and was loaded earlier with RTLD_GLOBAL wins: the
matmul then runs at MKL's speed, with no rebuild of MLX. The library comes
from the `mkl` wheel (libmkl_rt), the one PyPI package found that exports unprefixed names and
loads on a bare Linux machine (OpenBLAS wheels either prefix their names or need the system's
libgfortran). Set LOREFT_NO_FAST_BLAS=1 to keep MLX's own BLAS.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

OPT_OUT_ENV = "LOREFT_NO_FAST_BLAS"
_result: str | None = None  # what an earlier call loaded, so repeat calls are cheap and agree
_library: ctypes.CDLL | None = None  # the loaded MKL, for its thread count
_default_threads = 1  # MKL's own thread count (a thread per core, or MKL_NUM_THREADS) when it was loaded


def _mkl_rt() -> tuple[Path, str] | None:
    """Path and version of libmkl_rt from the installed `mkl` wheel, or None."""
    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None
    # The wheel puts its libraries in <prefix>/lib, outside site-packages: ask its file list.
    for f in sorted(dist.files or [], key=lambda f: f.name):
        if f.name.startswith("libmkl_rt.so"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path, dist.version
    return None


def enable_fast_blas() -> str | None:
    """Load an optimized BLAS for MLX's CPU matmuls; return what was loaded, or None. Never raises."""
    global _result, _library, _default_threads
    if _result is not None:
        return _result
    try:
        if not sys.platform.startswith("linux"):
            return None  # macOS uses Accelerate; the symbol preload is a Linux (ELF) trick
        if os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
            log.debug("fast BLAS: disabled by %s", OPT_OUT_ENV)
            return None
        found = _mkl_rt()
        if found is None:
            log.debug("fast BLAS: the mkl package is not installed")
            return None
        if "mlx.core" in sys.modules:
            # libmlx has already bound cblas_sgemm to its bundled BLAS; loading now changes nothing
            warnings.warn("mlx.core was imported before loreft.backend.setup(): MLX keeps its slower bundled BLAS. "
                          "Call setup() before importing mlx (or set LOREFT_NO_FAST_BLAS=1 to silence this).",
                          RuntimeWarning, stacklevel=3)
            return None
        path, version = found
        probe = ctypes.CDLL(str(path))  # RTLD_LOCAL: check it before it can change any lookup
        if not all(hasattr(probe, name) for name in ("cblas_sgemm", "cblas_dgemm")):
            log.debug("fast BLAS: %s lacks cblas_sgemm/cblas_dgemm", path)
            return None
        _library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # now libmlx will bind to it
        _default_threads = _library.MKL_Get_Max_Threads()
        _result = f"mkl {version} ({path.name})"
        log.debug("fast BLAS: loaded %s from %s", _result, path)
        return _result
    except Exception as exc:  # noqa: BLE001  a broken install must never stop training
        log.debug("fast BLAS: not loaded (%s: %s)", type(exc).__name__, exc)
        return None


@contextlib.contextmanager
def blas_threads(threads: int | None):
    """Within the block, each call into the fast BLAS uses `threads` threads (None: MKL's own count); no change without MKL."""
    if _library is None:
        yield
        return
    before = _library.MKL_Get_Max_Threads()
    _library.MKL_Set_Num_Threads(max(1, threads or _default_threads))
    try:
        yield
    finally:
        _library.MKL_Set_Num_Threads(before)


def cores_shared_by(streams: int) -> contextlib.AbstractContextManager:
    """blas_threads for `streams` streams that call the fast BLAS at once: each call gets its share of the threads.

    With MKL's own count in each, two streams on two cores would run four threads, each waiting on the others.
    """
    return blas_threads(max(1, _default_threads // streams))
