"""How many distinct kernels one compiled training step makes MLX generate: ours against mlx-lm LoRA.

Each distinct fused kernel of an `mx.compile`d step is compiled once per process (or read from MLX's
on-disk cache): on CUDA that JIT compile is most of the first step's time. This runs one step of each
method in a fresh process with its own empty kernel folder and counts what appeared there:
  CPU:  the fused kernels' sources under $TMPDIR/mlx/<version>/cpu (one module per fused graph)
  CUDA: MLX_PTX_CACHE_DIR (every JIT module: fused graphs, and the gather/scatter/... kernels MLX JITs)

    python bench/kernel_count.py                         # narrow 24-layer qwen2 on this CPU, f32
    python bench/kernel_count.py --shape qwen2-0.5b --dtype bfloat16 --batch 8 --seq 512   (a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NARROW = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 512}  # qwen2's 24 layers and structure, small enough for a CPU


def modules(folder: Path) -> list[str]:
    """Distinct kernel modules in a kernel folder (a module's files share its name up to the extension)."""
    names = set()
    for f in folder.rglob("*"):
        if f.is_file():
            stem = re.sub(r"^lib", "", f.name.split(".")[0])
            names.add(re.sub(r"_(contiguous|strided(_\d+)?)$", "", stem))
    return sorted(names)


def worker(a: argparse.Namespace) -> None:
    """One step of one method (a.method) in this process; prints its wall time."""
    import loreft.backend

    loreft.backend.setup()  # first: fast BLAS on a Linux CPU, the CUDA settings on a GPU
    import mlx.core as mx
    import numpy as np

    from bench.mlx_bench import Setting, lora_runner, loreft_runner
    from bench.shapes import SHAPES

    if a.narrow:
        SHAPES[a.shape] = {**SHAPES[a.shape], **NARROW}
    if a.cpu:
        mx.set_default_device(mx.cpu)
    s = Setting(shape=a.shape, batch=a.batch, seq=a.seq, dtype=a.dtype, data=a.data)
    t0 = time.perf_counter()
    runner = (lora_runner(s) if a.method == "lora" else
              loreft_runner(s, "ours", **json.loads(a.kwargs)))
    runner.step()
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    runner.step()
    print(json.dumps({"first_step_s": round(first, 2), "second_step_s": round(time.perf_counter() - t1, 3)}))


def count(a: argparse.Namespace, method: str, kwargs: dict) -> dict:
    """Run the worker with an empty kernel folder; return the modules it generated and its times."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TMPDIR": tmp, "MLX_PTX_CACHE_DIR": str(Path(tmp) / "ptx")}
        args = [sys.executable, __file__, "--worker", "--method", method, "--kwargs", json.dumps(kwargs),
                "--shape", a.shape, "--dtype", a.dtype, "--batch", str(a.batch), "--seq", str(a.seq), "--data", a.data]
        args += (["--narrow"] if a.narrow else []) + (["--cpu"] if a.cpu else [])
        out = subprocess.run(args, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        found = modules(Path(tmp))
        return {"method": method, "kwargs": kwargs, "modules": len(found), **json.loads(out.stdout.strip().splitlines()[-1]),
                "names": found}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2-0.5b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--data", default="completion", choices=["all", "completion"])
    p.add_argument("--narrow", action=argparse.BooleanOptionalAction, default=None,
                   help="shrink the widths (default: on a CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    p.add_argument("--variants", default='[{}]', help='JSON list of loreft_runner kwargs, e.g. [{}, {"off": ["fused_ce"]}]')
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.narrow is None:
        import mlx.core as mx

        a.narrow = a.cpu or not mx.cuda.is_available()
    rows = [count(a, "lora", {})] + [count(a, "loreft", kw) for kw in json.loads(a.variants)]
    for r in rows:
        print(f"{r['method']:<7} {json.dumps(r['kwargs']):<40} {r['modules']:>4} kernel modules, "
              f"first step {r['first_step_s']:.1f} s, next {r['second_step_s'] * 1e3:.0f} ms", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
