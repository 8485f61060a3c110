"""loreft.cpu_kernels: MLX's fused CPU kernels built through the g++ wrapper are vectorized (no libm fmaf
calls left), give the same values as MLX's own build, stale kernels are dropped once, and the opt-out works.

Each case runs in a fresh interpreter with its own temp folder, so MLX's kernel cache starts empty.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
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
applied = loreft.backend.setup()
import mlx.core as mx
import numpy as np
x = mx.array(np.random.default_rng(0).normal(0, 4, (64, 1000)).astype(np.float32))
f = mx.compile(lambda x: (mx.exp(x - x.max(-1, keepdims=True)).sum(-1), mx.sigmoid(x) * x))
rows, silu = f(x)
mx.eval(rows, silu)
folder = os.path.join(os.environ["TMPDIR"], "mlx", mx.__version__, "cpu")
libs = {n: b"fmaf" in open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".so")}
print(json.dumps({"applied": applied, "rows": np.array(rows).tolist(), "silu": np.array(silu).ravel()[:4000].tolist(),
                  "libs": libs, "path0": os.environ["PATH"].split(os.pathsep)[0]}))
"""


def run_child(tmp_path: Path, name: str, **env: str) -> dict:
    temp = tmp_path / name
    temp.mkdir()
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


def test_stale_kernels_dropped_once(tmp_path):
    import mlx.core as mx

    folder = tmp_path / "t" / "mlx" / mx.__version__ / "cpu"
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "t"), "LOREFT_CACHE": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin"}
    env.pop(cpu_kernels.OPT_OUT_ENV, None)

    def setup_in_child():
        code = "import loreft.backend; print(loreft.backend.setup()['cpu_kernels'])"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "True", out.stderr[-2000:]

    (folder / "libstale.so").write_bytes(b"built by MLX's own command")
    setup_in_child()
    assert not (folder / "libstale.so").exists()
    assert (folder / cpu_kernels.MARKER).read_text() == cpu_kernels.FLAGS
    (folder / "libnew.so").write_bytes(b"built through the wrapper")
    setup_in_child()
    assert (folder / "libnew.so").exists()  # the marker says the folder is current: nothing dropped
