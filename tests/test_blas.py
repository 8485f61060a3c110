"""loreft.backend / loreft.blas: MLX CPU matmuls through MKL match float64 numpy, the opt-out loads nothing,
the library is really loaded by setup(), and importing loreft alone changes nothing in the process.

Each case runs in a fresh interpreter: libmlx binds cblas_sgemm once, when mlx.core is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
LIB = "libmkl_rt"  # the file loreft.blas loads, as it appears in /proc/self/maps


def _has_mkl() -> bool:
    try:
        metadata.distribution("mkl")
        return True
    except metadata.PackageNotFoundError:
        return False


needs_linux = pytest.mark.skipif(not LINUX, reason="/proc/self/maps and the preload are Linux-only")
needs_mkl = pytest.mark.skipif(not (LINUX and _has_mkl()), reason="needs Linux and the mkl package")

# Printed as the last line of every child: what setup() reports and whether the library is mapped.
REPORT = f"""
import warnings
from loreft.backend import setup
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["fast_blas"] = setup()["fast_blas"]
out["warned"] = [str(w.message) for w in caught]
out["mapped"] = {LINUX} and any("{LIB}" in line for line in open("/proc/self/maps"))
print(json.dumps(out))
"""


def run_child(code: str, *args: str, **env: str) -> dict:
    """Run code (with sys.argv[1:] = args) in a fresh python with loreft importable; return the JSON it prints last."""
    # as a fresh shell would have it: this process's setup() set MLX_BFS_MAX_WIDTH
    child_env = {k: v for k, v in os.environ.items() if k not in ("LOREFT_NO_FAST_BLAS", "MLX_BFS_MAX_WIDTH")}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    child_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", code + REPORT, *args],
        check=False,
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SETUP = "import loreft.backend\nloreft.backend.setup()\n"  # first, as the CLI does: before mlx.core

NUMERICS = SETUP + """
import json
import numpy as np
import mlx.core as mx
import mlx.nn as nn

rng = np.random.default_rng(0)
f64 = lambda x: np.asarray(x, dtype=np.float64)
rel = lambda got, ref: float(np.linalg.norm(f64(got) - ref) / np.linalg.norm(ref))
out = {}

a = rng.standard_normal((256, 384)).astype(np.float32)
b = rng.standard_normal((384, 128)).astype(np.float32)
out["matmul"] = rel(mx.array(a) @ mx.array(b), f64(a) @ f64(b))
out["matmul_transposed"] = rel(mx.array(b).T @ mx.array(a).T, (f64(a) @ f64(b)).T)
x3, w3 = rng.standard_normal((3, 64, 96)).astype(np.float32), rng.standard_normal((3, 96, 32)).astype(np.float32)
out["batched"] = rel(mx.array(x3) @ mx.array(w3), f64(x3) @ f64(w3))
a64, b64 = mx.array(a, dtype=mx.float64), mx.array(b, dtype=mx.float64)  # cblas_dgemm
out["float64"] = rel(mx.matmul(a64, b64, stream=mx.cpu), f64(a) @ f64(b))

# A linear layer's loss and parameter gradients against the float64 closed form.
lin = nn.Linear(384, 128)
y = rng.standard_normal((256, 128)).astype(np.float32)
loss, grads = nn.value_and_grad(lin, lambda x, t: 0.5 * ((lin(x) - t) ** 2).sum())(mx.array(a), mx.array(y))
err = f64(a) @ f64(lin.weight).T + f64(lin.bias) - f64(y)
out["loss"] = abs(float(loss) - 0.5 * (err ** 2).sum()) / (0.5 * (err ** 2).sum())
out["grad_weight"] = rel(grads["weight"], err.T @ f64(a))
out["grad_bias"] = rel(grads["bias"], err.sum(0))

# MKL also supplies the LAPACK routines behind mx.linalg: check two of them.
m = (rng.standard_normal((16, 16)) + 16 * np.eye(16)).astype(np.float32)
out["inv"] = rel(mx.linalg.inv(mx.array(m), stream=mx.cpu), np.linalg.inv(f64(m)))
s = m + m.T
out["eigvalsh"] = rel(mx.linalg.eigvalsh(mx.array(s), stream=mx.cpu), np.linalg.eigvalsh(f64(s)))
"""


def test_float32_matmul_and_linear_grad_match_float64():
    out = run_child(NUMERICS)
    for key in ("matmul", "matmul_transposed", "batched", "loss", "grad_weight", "grad_bias", "inv", "eigvalsh"):
        assert out[key] < 1e-5, (key, out[key], out["fast_blas"])
    assert out["float64"] < 1e-12, out


@needs_linux
def test_opt_out_loads_nothing():
    out = run_child(
        SETUP + "import json\nimport mlx.core as mx\nmx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))\nout = {}",
        LOREFT_NO_FAST_BLAS="1",
    )
    assert out == {"fast_blas": None, "mapped": False, "warned": []}


@needs_mkl
def test_enabled_maps_the_library():
    out = run_child(SETUP + "import json\nimport mlx.core as mx\nout = {}")
    assert out["mapped"] and out["warned"] == [], out
    assert out["fast_blas"].startswith("mkl "), out


@needs_mkl
def test_setup_after_mlx_core_changes_nothing_and_warns():
    out = run_child("import mlx.core, json\nout = {}")
    assert out["fast_blas"] is None and not out["mapped"], out
    assert len(out["warned"]) == 1 and "before loreft.backend.setup()" in out["warned"][0], out


IMPORT_ONLY = """
import json, os, sys
env = dict(os.environ)
import loreft
out = {"mlx_after_import": "mlx.core" in sys.modules}
from loreft import ReftConfig, attach  # the names load MLX on first use, still without the fast BLAS
import mlx.core as mx
mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
out["env_same"] = dict(os.environ) == env
out["mapped_before_setup"] = %s and any("%s" in line for line in open("/proc/self/maps"))
""" % (LINUX, LIB)


def test_import_loreft_changes_nothing():
    out = run_child(IMPORT_ONLY)
    assert out["mlx_after_import"] is False, out  # the package itself imports no MLX
    assert out["env_same"] and out["mapped_before_setup"] is False, out


FORWARD_GRAD = SETUP + """
import json, sys
import numpy as np
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load

model, _ = load(sys.argv[1])
tokens = mx.array(np.random.default_rng(0).integers(0, 200, size=(2, 24)))

def loss_fn(model):
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

loss, grads = nn.value_and_grad(model, loss_fn)(model)
out = {"loss": float(loss), "logits": np.array(model(tokens[:, :-1])[0, -1]).tolist(),
       "grads": {k: float(mx.linalg.norm(g)) for k, g in tree_flatten(grads)}}
"""


@needs_mkl
def test_mlx_lm_forward_and_grad_match_stock_blas(tmp_path):
    """The same tiny llama gives the same loss, logits and gradient norms with MKL as with MLX's own BLAS."""
    build = (
        SETUP + "import json, sys\nfrom loreft.demo import build_tiny_model\n"
        "build_tiny_model(sys.argv[1], hidden_size=64, num_layers=2, intermediate_size=128)\nout = {}"
    )
    run_child(build, str(tmp_path))
    fast = run_child(FORWARD_GRAD, str(tmp_path))
    stock = run_child(FORWARD_GRAD, str(tmp_path), LOREFT_NO_FAST_BLAS="1")
    assert fast["mapped"] and not stock["mapped"]
    assert abs(fast["loss"] - stock["loss"]) < 1e-5 * abs(stock["loss"])
    assert max(abs(f - s) for f, s in zip(fast["logits"], stock["logits"])) < 1e-4
    assert fast["grads"].keys() == stock["grads"].keys() and len(fast["grads"]) > 10
    for name, norm in stock["grads"].items():
        assert abs(fast["grads"][name] - norm) <= 1e-4 * norm + 1e-7, name


GRAPH_WIDTH = """
import json, os
from loreft.backend import CPU_GRAPH_WIDTH, setup
applied = setup()
import mlx.core as mx
out = {"set": applied["cpu_streams_interleaved"], "width": os.environ.get("MLX_BFS_MAX_WIDTH"),
       "expected": CPU_GRAPH_WIDTH, "cpu": mx.default_device() == mx.cpu}
"""


def test_setup_unbounds_the_graph_order_on_a_cpu_unless_the_user_set_it():
    # a CPU step's row shards run at once only if MLX interleaves their streams' work (loreft.trainer.row_shards)
    out = run_child(GRAPH_WIDTH)
    if not out["cpu"]:
        pytest.skip("MLX's default device is a GPU here")
    assert out["set"] is True and out["width"] == out["expected"], out
    out = run_child(GRAPH_WIDTH, MLX_BFS_MAX_WIDTH="7")
    assert out["set"] is False and out["width"] == "7", out
