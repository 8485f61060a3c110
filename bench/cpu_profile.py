"""Where a CPU training step's time goes, by kind of operation: ours against pyreft on torch, from perf samples.

Runs Linux `perf record` on the CPU suite's step (llama-small, float32, batch 4 x 256): ours through
bench/step_timing.py, pyreft's through bench/pyreft_bench.py in the python that has torch + pyreft. Each
sample's symbol is sorted into a kind (BLAS matmul, thread wait, exp and its libm calls, MLX's fused JIT
kernels, ...) and the kinds are printed as shares of the step's samples, with the top symbols. Shares, not
seconds: on a machine other jobs share they hold up better than timings. Model setup and compilation are
in the samples too; more steps make them smaller.

    python bench/cpu_profile.py [--data all|completion] [--steps 20] [--pyreft-python PATH] [--top 12]
    python bench/cpu_profile.py --shape smollm2-135m --batch 8 --seq 96 --data completion --steps 3 --no-pyreft
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"cc1plus", "as", "ld", "collect2", "g++", "sh", "perf"}  # the JIT compiler's processes: not the step

# (kind, pattern on "dso symbol"), first match wins
KINDS = [
    ("matmul (BLAS)", r"gemm|mkl_blas|dnnl|brgemm|sgemv"),
    ("thread wait / scheduling", r"kmp_|__kmp|omp_|gomp|sched_yield|futex|finish_task_switch|pthread_cond|spin"),
    ("exp (incl. libm fmaf calls)", r"simd::exp|fmaf|Sleef|expf|\bexp\b|__exp"),
    ("MLX fused kernels (JIT)", r"_(contiguous|strided_\d+)\.so"),
    ("softmax / logsumexp", r"softmax|logsumexp"),
    ("reductions", r"reduc|Reduce|sum_|_sum|max_|_max|mean"),
    ("copies / gather / scatter", r"copy|gather|scatter|index|take|memcpy|memmove|transpose|cat_|Cat|slice"),
    ("elementwise (other)", r"binary|unary|ternary|Multiply|Add|Subtract|Divide|Sigmoid|silu|where|select|vectorized|mul_|add_"),
    ("python / host", r"libpython|python3"),
    ("OS kernel", r"\[kernel"),
]


def classify(line: str) -> str:
    return next((kind for kind, pat in KINDS if re.search(pat, line)), "other")


def profile(cmd: list[str], env: dict, out: Path) -> dict:
    """perf record cmd; {kinds: {kind: share}, top: [(share, symbol)]} over the samples of the command's own threads."""
    data = out.with_suffix(".perf")
    subprocess.run(["perf", "record", "-F", "499", "-o", str(data), "--", *cmd], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "comm,dso,sym", "--stdio", "--no-children"],
                            capture_output=True, text=True, check=True).stdout
    samples: Counter = Counter()
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)", line)
        if not m or m.group(2) in TOOLS:
            continue
        samples[re.sub(r"\s+", " ", m.group(3)).strip()[:160]] += float(m.group(1))
    total = sum(samples.values()) or 1.0
    kinds: Counter = Counter()
    for sym, share in samples.items():
        kinds[classify(sym)] += share / total
    return {"kinds": dict(kinds.most_common()), "top": [(round(100 * s / total, 1), sym) for sym, s in samples.most_common()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--data", choices=["all", "completion"], default="all")
    p.add_argument("--no-pyreft", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pyreft-python", default=os.environ.get("PYREFT_PYTHON", "/tmp/pyreft-venv/bin/python"))
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    shape = ["--shape", a.shape, "--dtype", "float32", "--batch", str(a.batch), "--seq", str(a.seq)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = [sys.executable, str(ROOT / "bench" / "step_timing.py"), *shape, "--steps", str(a.steps), "--data", a.data]
        results["ours (MLX)"] = profile(ours, dict(os.environ), Path(tmp) / "ours")
        if Path(a.pyreft_python).exists() and not a.no_pyreft:
            setting = {"shape": a.shape, "batch": a.batch, "seq": a.seq, "dtype": "float32", "data": a.data,
                       "warmup": 2, "steps": a.steps, "rounds": 1}
            spec = Path(tmp) / "spec.json"
            spec.write_text(json.dumps({"device": "cpu", "peak_n": 64, "peak_iters": 1, "setting": setting}))
            theirs = [a.pyreft_python, str(ROOT / "bench" / "pyreft_bench.py"), str(spec), str(Path(tmp) / "r.json")]
            results["pyreft (torch)"] = profile(theirs, dict(os.environ), Path(tmp) / "pyreft")
    kinds = list(dict.fromkeys(k for r in results.values() for k in r["kinds"]))
    print("share of samples | " + " | ".join(results))
    for kind in kinds:
        print(f"{kind} | " + " | ".join(f"{100 * r['kinds'].get(kind, 0):.1f}%" for r in results.values()))
    for name, r in results.items():
        print(f"\n{name}: top symbols")
        for share, sym in r["top"][:a.top]:
            print(f"  {share:5.1f}%  {sym}")


if __name__ == "__main__":
    main()
