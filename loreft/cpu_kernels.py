"""Vectorized fused kernels for MLX on x86-64 Linux CPUs (applied by backend.setup).

mx.compile on a CPU writes each fused elementwise kernel as C++ and builds it by running `g++` from PATH.
The Linux wheel passes no instruction-set flags, so g++ targets baseline x86-64: each fma in MLX's exp
polynomial becomes a call into libm, and the loops stay scalar (exp, sigmoid: ~10 ns an element). A g++
wrapper that adds -mavx2 -mfma (what MLX itself passes when it is built for AVX2), -fno-trapping-math and a
larger inline limit to MLX's kernel builds (other compilations pass through) lets g++ inline and vectorize
those loops. The values do not change: the fmas were already fused (libm's fmaf rounds once too), g++
does not contract other products in C++17 mode, and the other two flags only allow if-conversion and
inlining. Set LOREFT_NO_FAST_KERNELS=1 to keep MLX's command.

MLX keeps built kernels in <temp>/mlx/<version>/cpu and never rebuilds one that is there, whoever built it: any
other MLX program on the machine (mlx_lm lora, say) leaves kernels of the same names built without the flags.
So the wrapper also names each kernel it builds (its ELF soname says the flags), and setup() drops the kernels
in that folder that do not carry the name.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from .backend import kernel_cache_root

log = logging.getLogger(__name__)

OPT_OUT_ENV = "LOREFT_NO_FAST_KERNELS"
FLAGS = "-mavx2 -mfma -fno-trapping-math -finline-limit=1000"
SONAME = "loreft-jit-avx2-fma-1"  # the wrapper's kernels carry it; change it with FLAGS
FOREIGN_AGE_S = 60  # a kernel without that name is dropped once it is this old: younger, its builder may not have loaded it
_active = False


def active() -> bool:
    """True when this process's fused CPU kernels are built vectorized (enable() succeeded)."""
    return _active


def _cpu_has(*features: str) -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(features) <= set(flags.split(":", 1)[1].split())


def _mlx_kernel_dir(version: str) -> Path:
    """Where MLX keeps built CPU kernels: C++'s temp_directory_path() / mlx / version / cpu."""
    temp = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(temp) / "mlx" / version / "cpu"


def _write_wrapper(folder: Path, compiler: str) -> None:
    """folder/g++: the real compiler, with FLAGS for MLX's kernel builds only (written when missing or different)."""
    text = (
        "#!/bin/sh\n"
        "# written by loreft.backend.setup(): MLX's fused CPU kernels (built in <temp>/mlx/<version>/cpu) vectorized;\n"
        "# any other compilation passes through unchanged\n"
        'case "$*" in\n'
        f'  *-shared*/mlx/*/cpu/*) exec "{compiler}" {FLAGS} -Wl,-soname,{SONAME} "$@" ;;\n'
        f'  *) exec "{compiler}" "$@" ;;\n'
        "esac\n"
    )
    path = folder / "g++"
    if path.is_file() and path.read_text() == text:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".g++.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def _drop_foreign_kernels(folder: Path) -> None:
    """Remove the kernels in MLX's folder that the wrapper did not build (MLX then rebuilds them through it)."""
    if not folder.is_dir():
        return
    now = time.time()
    for lib in folder.glob("lib*.so"):
        try:
            if SONAME.encode() not in lib.read_bytes() and now - lib.stat().st_mtime >= FOREIGN_AGE_S:
                lib.unlink()  # a process that loaded it keeps its mapping
        except OSError:
            pass


def enable(mlx_version: str) -> bool:
    """Put the g++ wrapper first on PATH for MLX's CPU kernel builds; True if it did. Never raises."""
    global _active
    if _active:
        return True
    try:
        folder = kernel_cache_root() / "cpu-jit"
        if os.environ.get(OPT_OUT_ENV, "").strip() not in ("", "0"):
            # a parent process's wrapper on PATH would still apply the flags: leave it out
            os.environ["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != str(folder))
            return False
        if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
            return False  # macOS builds its kernels with Accelerate's vectors; the flags are x86 ones
        compiler = shutil.which("g++")
        if compiler is None or not _cpu_has("avx2", "fma"):
            return False
        if Path(compiler).resolve() == (folder / "g++").resolve():
            _active = True  # already first on PATH (a child of a process that ran setup)
            return True
        _write_wrapper(folder, compiler)
        _drop_foreign_kernels(_mlx_kernel_dir(mlx_version))
        os.environ["PATH"] = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
        _active = True
        return True
    except Exception as exc:  # noqa: BLE001  a read-only cache or odd machine must never stop training
        log.debug("fast CPU kernels: not enabled (%s: %s)", type(exc).__name__, exc)
        return False
