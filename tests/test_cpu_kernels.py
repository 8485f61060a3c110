"""loreft.cpu_kernels: MLX's fused CPU kernels built through the g++ wrapper are vectorized (no libm fmaf
calls left), give the same values as MLX's own build, kernels another MLX program built are dropped and
rebuilt, and the opt-out works.

Each case runs in a fresh interpreter with its own temp folder, so MLX's kernel cache starts empty.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loreft import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64" and shutil.which("g++")
         and cpu_kernels._cpu_has("avx2", "fma")),
    reason="needs x86-64 Linux with AVX2/FMA and g++",
)

# exp, sigmoid and a softmax-style row sum in one compiled function; prints values, what setup() applied,
# and the kernel libraries MLX built (with whether each still calls libm's fmaf)
CHILD = """
import json, os, sys
import loreft.backend
from loreft import cpu_kernels
applied = loreft.backend.setup()
import mlx.core as mx
import numpy as np
x = mx.array(np.random.default_rng(0).normal(0, 4, (64, 1000)).astype(np.float32))
f = mx.compile(lambda x: (mx.exp(x - x.max(-1, keepdims=True)).sum(-1), mx.sigmoid(x) * x))
rows, silu = f(x)
mx.eval(rows, silu)
folder = os.path.join(os.environ["TMPDIR"], "mlx", mx.__version__, "cpu")
libs = {n: b"fmaf" in open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".so")}
named = sorted(n for n in libs if cpu_kernels.SONAME.encode() in open(os.path.join(folder, n), "rb").read())
print(json.dumps({"applied": applied, "rows": np.array(rows).tolist(), "silu": np.array(silu).ravel()[:4000].tolist(),
                  "libs": libs, "named": named, "path0": os.environ["PATH"].split(os.pathsep)[0]}))
"""


def run_child(tmp_path: Path, name: str, **env: str) -> dict:
    temp = tmp_path / name
    temp.mkdir(exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k != cpu_kernels.OPT_OUT_ENV}
    child_env.update(PYTHONPATH=str(ROOT), TMPDIR=str(temp), LOREFT_CACHE=str(tmp_path / "cache"), **env)
    # a PATH without a wrapper a parent process put there
    child_env["PATH"] = os.pathsep.join(p for p in child_env["PATH"].split(os.pathsep) if not p.endswith("cpu-jit"))
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_wrapper_vectorizes_kernels_and_keeps_values(tmp_path):
    fast = run_child(tmp_path, "fast")
    plain = run_child(tmp_path, "plain", **{cpu_kernels.OPT_OUT_ENV: "1"})
    assert fast["applied"]["cpu_kernels"] is True and plain["applied"]["cpu_kernels"] is False
    assert fast["path0"] == str(tmp_path / "cache" / "cpu-jit")
    # MLX's own command leaves exp's fmas as libm calls; the wrapper's flags inline them
    assert plain["libs"] and any(plain["libs"].values()), plain["libs"]
    assert fast["libs"] and not any(fast["libs"].values()), fast["libs"]
    assert fast["rows"] == plain["rows"] and fast["silu"] == plain["silu"]  # bit for bit
    # any other compilation through the wrapper keeps the compiler's own target
    macros = subprocess.run([fast["path0"] + "/g++", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True)
    real = shutil.which("g++", path=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.endswith("cpu-jit")))
    plain_macros = subprocess.run([real, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True)
    assert macros.returncode == 0 and macros.stdout == plain_macros.stdout
    x = np.random.default_rng(0).normal(0, 4, (64, 1000))
    want = np.exp(x - x.max(-1, keepdims=True)).sum(-1)
    np.testing.assert_allclose(fast["rows"], want, rtol=1e-5)


def test_kernels_another_mlx_program_built_are_rebuilt_with_the_flags(tmp_path):
    # MLX's own command (here: the opt-out) fills the shared kernel folder first, as mlx_lm lora would
    plain = run_child(tmp_path, "shared", **{cpu_kernels.OPT_OUT_ENV: "1"})
    assert plain["libs"] and any(plain["libs"].values()) and plain["named"] == [], plain
    import mlx.core as mx

    folder = tmp_path / "shared" / "mlx" / mx.__version__ / "cpu"
    old = time.time() - 2 * cpu_kernels.FOREIGN_AGE_S
    for lib in folder.glob("lib*.so"):
        os.utime(lib, (old, old))
    (folder / "libjust-built-elsewhere.so").write_bytes(b"its builder may not have loaded it yet")
    fast = run_child(tmp_path, "shared")
    # the same kernels, rebuilt through the wrapper: no libm fmaf calls, each carrying the wrapper's name
    assert set(fast["libs"]) == set(plain["libs"]) | {"libjust-built-elsewhere.so"}
    assert not any(v for n, v in fast["libs"].items() if n != "libjust-built-elsewhere.so"), fast["libs"]
    assert fast["named"] == sorted(plain["libs"])
    assert fast["rows"] == plain["rows"] and fast["silu"] == plain["silu"]
    assert (folder / "libjust-built-elsewhere.so").exists()  # too young to drop
