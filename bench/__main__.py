"""python -m bench: LoReFT (loreft.trainer's step) vs mlx-lm LoRA vs pyreft, on one shape, data and settings.

    python -m bench                 # the CPU suite here (about 3-4 minutes on 2 cores), the GPU suite on CUDA
    python -m bench --suite gpu     # Qwen2-0.5B and Llama-3.2-1B shapes, bf16, batch 8 x 512
    python -m bench --quick         # fewer steps (a smoke test)
    python -m bench --suite serve   # serving: loreft serve + adapter vs mlx_lm.server (bench/serving.py)

Each MLX setting runs in a worker process (the CPU suite runs three: with loreft.blas's fast BLAS, with
the fast BLAS but MLX's own build of its fused kernels (LOREFT_NO_FAST_KERNELS=1), and with
LOREFT_NO_FAST_BLAS=1, since both are chosen before mlx.core loads); pyreft runs in its
own python (PYREFT_PYTHON or --pyreft-python; PYTHONPATH for it via --pyreft-pythonpath). Prints a
table and writes JSON (and a markdown table) under runs/bench/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import markdown_tables, print_tables, ratios, sections

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYREFT = "/tmp/pyreft-venv/bin/python"

OURS = "LoReFT (ours)"
LORA = "mlx-lm LoRA"


def lever_runners() -> list[dict]:
    """Our step with each lever off in turn, plus diagnostics that bound what any step can reach."""
    return [
        {"kind": "loreft", "name": "ours, before this work", "kwargs": {"off": ["batched_rotations", "fused_scatter", "sparse_logits", "fused_ce"]}},
        {"kind": "loreft", "name": "ours, no mx.compile", "kwargs": {"off": ["compile"]}},
        {"kind": "loreft", "name": "ours, R per intervention", "kwargs": {"off": ["batched_rotations"]}},
        {"kind": "loreft", "name": "ours, gather/scatter kernels", "kwargs": {"off": ["select_matmul"]}},
        {"kind": "loreft", "name": "ours, gather/scatter per group", "kwargs": {"off": ["fused_scatter"]}},
        {"kind": "loreft", "name": "ours, masked (no gather)", "kwargs": {"off": ["gather"]}},
        {"kind": "loreft", "name": "ours, generic CE gradient", "kwargs": {"off": ["fused_ce"]}},
        {"kind": "loreft", "name": "ours, head logits kept for backward", "kwargs": {"off": ["head_grad"]}},
        {"kind": "loreft", "name": "ours, rows on one stream", "kwargs": {"off": ["row_shards"]}},
        {"kind": "loreft", "name": "ours, clear cache each step", "kwargs": {"clear_cache": True}},
        {"kind": "loreft", "name": "diag: top layer only", "kwargs": {"layers": "last"}},
        {"kind": "loreft", "name": "diag: layer 0, l1 (backprop floor)", "kwargs": {"layers": [0], "positions": "l1"}},
        {"kind": "forward", "name": "diag: forward + loss only"},
        {"kind": "loreft", "name": "diag: ours again, timed last (order check)"},
    ]


def core_runners() -> list[dict]:
    return [{"kind": "loreft", "name": OURS}, {"kind": "lora", "name": LORA}]


def main_comparisons(base: dict, quick: bool, decode: dict) -> list[dict]:
    """Every token supervised (with the levers and a decode test), then the last quarter (with full logits too)."""
    full_logits = {"kind": "loreft", "name": "ours, full logits", "kwargs": {"off": ["sparse_logits"]}}
    return [
        {"setting": base, "runners": core_runners() + ([] if quick else lever_runners()), "decode": decode},
        {"setting": {**base, "data": "completion"}, "runners": core_runners() + [full_logits]},
    ]


def suite(name: str, quick: bool) -> dict:
    """Worker specs and pyreft settings of the CPU or GPU suite."""
    if name == "cpu":
        shape, dtype, batch, seq = "llama-small", "float32", 4, 256
        timing = {"warmup": 1, "steps": 1, "rounds": 2} if quick else {"warmup": 2, "steps": 2, "rounds": 3}
        base = {"shape": shape, "batch": batch, "seq": seq, "dtype": dtype, **timing}
        main = {
            "device": "cpu", "peak_dtype": "float32", "peak_n": 1024, "peak_iters": 5,
            "comparisons": main_comparisons(base, quick, {"prompt_len": 64, "new_tokens": 32, "rounds": 3}),
        }
        slow = {"device": "cpu", "peak_dtype": "float32", "peak_n": 512, "peak_iters": 3,
                "comparisons": [{"setting": {**base, "warmup": 1, "steps": 1, "rounds": 2}, "runners": core_runners()}]}
        # the same steps with MLX's own build of its fused CPU kernels (loreft.cpu_kernels off), in a temp folder
        # of its own so that it does not load the kernels the first worker built with the wrapper's flags
        plain_kernels = {"device": "cpu", "peak_dtype": "float32", "peak_n": 1024, "peak_iters": 5,
                         "comparisons": [{"setting": base, "runners": core_runners()},
                                         {"setting": {**base, "data": "completion"}, "runners": core_runners()}]}
        plain_env = {"LOREFT_NO_FAST_KERNELS": "1", "TMPDIR": tempfile.mkdtemp(prefix="bench-mlx-kernels-")}
        workers = [("mlx cpu, fast BLAS", main, {}), ("mlx cpu, fast BLAS, MLX's own kernel build", plain_kernels, plain_env),
                   ("mlx cpu, bundled BLAS", slow, {"LOREFT_NO_FAST_BLAS": "1"})]
        pyreft = [{"device": "cpu", "peak_dtype": "float32", "peak_n": 1024, "peak_iters": 5, "setting": base}]
        return {"workers": workers, "pyreft": pyreft}
    timing = {"warmup": 2, "steps": 3, "rounds": 2} if quick else {"warmup": 3, "steps": 5, "rounds": 3}
    qwen = {"shape": "qwen2-0.5b", "batch": 8, "seq": 512, "dtype": "bfloat16", **timing}
    llama = {**qwen, "shape": "llama-3.2-1b"}
    main = {
        "device": "gpu", "peak_dtype": "bfloat16", "peak_n": 8192, "peak_iters": 20,
        "comparisons": main_comparisons(qwen, quick, {"prompt_len": 128, "new_tokens": 128, "rounds": 3})
        + [{"setting": llama, "runners": core_runners()}],
    }
    pyreft = [{"peak_dtype": "bfloat16", "peak_n": 8192, "peak_iters": 20, "setting": s} for s in (qwen, llama)]
    return {"workers": [("mlx cuda", main, {})], "pyreft": pyreft}


def tiny(plan: dict) -> dict:
    """The same plan on a tiny shape with one step each: a dry run of any suite's code paths on any machine."""
    small = {"shape": "llama-small", "batch": 2, "seq": 64, "warmup": 1, "steps": 1, "rounds": 1}
    for _, spec, _ in plan["workers"]:
        spec.update(peak_n=256, peak_iters=2)
        for comp in spec["comparisons"]:
            comp["setting"] = {**comp["setting"], **small}
            if comp.get("decode"):
                comp["decode"] = {"prompt_len": 16, "new_tokens": 8, "rounds": 1}
    for spec in plan["pyreft"]:
        spec.update(peak_n=256, peak_iters=2, setting={**spec["setting"], **small})
    return plan


def run_worker(cmd: list[str], spec: dict, env_extra: dict, label: str, timeout: float | None = None) -> dict | None:
    """Run one worker on a spec; its log streams through; returns its JSON result (partial if it was cut short)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **env_extra}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env_extra.get("PYTHONPATH"), str(ROOT)]))
        print(f"== {label}: {' '.join(cmd[:3])} ...", flush=True)
        try:
            code = subprocess.run([*cmd, str(spec_path), str(result_path)], cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0:
            print(f"== {label}: FAILED ({code}); keeping what it saved", flush=True)
        if not result_path.is_file():
            return None
        result = json.loads(result_path.read_text())
        return result if code == 0 else {**result, "incomplete": str(code)}


def pyreft_python(args) -> str | None:
    """The python that can import torch + pyreft, or None (then pyreft is skipped)."""
    candidates = [args.pyreft_python, os.environ.get("PYREFT_PYTHON"), DEFAULT_PYREFT, sys.executable]
    env = {**os.environ, "PYTHONPATH": args.pyreft_pythonpath or ""}
    for py in filter(None, candidates):
        if not (Path(py).is_file() or shutil.which(py)):
            continue
        ok = subprocess.run([py, "-c", "import torch, pyreft"], env=env, capture_output=True).returncode == 0
        if ok:
            return py
    return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def detect_suite() -> str:
    probe = subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.default_device() == mx.gpu)"],
                           capture_output=True, text=True)
    return "gpu" if probe.stdout.strip() == "True" else "cpu"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["auto", "cpu", "gpu", "serve"], default="auto")
    p.add_argument("--quick", action="store_true", help="fewer steps and no lever variants")
    p.add_argument("--tiny", action="store_true", help="dry run: the suite's plan on a tiny shape, one step each")
    p.add_argument("--only", choices=["all", "mlx", "pyreft"], default="all")
    p.add_argument("--no-pyreft", action="store_true")
    p.add_argument("--pyreft-python", help="python with torch + pyreft (default: $PYREFT_PYTHON, /tmp/pyreft-venv)")
    p.add_argument("--pyreft-pythonpath", help="PYTHONPATH for that python (e.g. a --target install of pyreft)")
    p.add_argument("--pyreft-results", help="merge pyreft results measured earlier on this machine (JSON from --only pyreft)")
    p.add_argument("--keep", help="comma-separated name fragments: keep only these lever/diagnostic runners (plus ours and LoRA)")
    p.add_argument("--worker-timeout", type=float, help="seconds per worker process; a late one is stopped, its finished comparisons kept")
    p.add_argument("--out", help="JSON path (default runs/bench/<suite>-<time>.json; a .md table is written beside it)")
    args = p.parse_args(argv)
    if args.suite == "serve":  # its own script and options: python bench/serving.py --help
        from bench.serving import main as serving

        serving((["--max-tokens", "32", "--concurrency", "1,8"] if args.quick else []) + (["--out", args.out] if args.out else []))
        return

    name = detect_suite() if args.suite == "auto" else args.suite
    plan = tiny(suite(name, args.quick)) if args.tiny else suite(name, args.quick)
    if args.keep:
        wanted = [k.strip() for k in args.keep.split(",") if k.strip()]
        for _, spec, _ in plan["workers"]:
            for comp in spec["comparisons"]:
                comp["runners"] = [r for r in comp["runners"]
                                   if r["name"] in (OURS, LORA) or any(k in r["name"] for k in wanted)]
    started = datetime.datetime.now(datetime.timezone.utc)
    record = {"suite": name, "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
              "date": started.isoformat(timespec="seconds"), "machine": machine_info(), "workers": [], "pyreft": []}

    out = Path(args.out) if args.out else ROOT / "runs" / "bench" / f"{name}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every worker, so a run cut short keeps what it measured
        for _, _, rows, _, peak in sections(record):  # utilization against the device's peak, every method alike
            for r in rows:
                r["utilization"] = r["tokens_per_s"] * r["model_flops_per_token"] / peak if peak else None
        record["ratios"] = ratios(record)
        record["seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        out.write_text(json.dumps(record, indent=1))
        out.with_suffix(".md").write_text(markdown_tables(record))

    if args.pyreft_results:
        earlier = json.loads(Path(args.pyreft_results).read_text())
        for r in earlier.get("pyreft", []):
            record["pyreft_earlier"] = record.get("pyreft_earlier", []) + [{**r, "merged_from": args.pyreft_results}]
    if args.only in ("all", "mlx"):
        for label, spec, env in plan["workers"]:
            result = run_worker([sys.executable, "-m", "bench.mlx_bench"], spec, env, label, args.worker_timeout)
            if result is not None:
                record["workers"].append({"label": label, **result})
                save()
            if Path(env.get("TMPDIR", "")).name.startswith("bench-mlx-kernels-"):
                shutil.rmtree(env["TMPDIR"], ignore_errors=True)  # that worker's own kernel folder
    if args.only in ("all", "pyreft") and not args.no_pyreft:
        py = pyreft_python(args)
        if py is None:
            print("== pyreft: not importable (set PYREFT_PYTHON / --pyreft-python); skipped", flush=True)
        for spec in plan["pyreft"] if py else []:
            env = {"PYTHONPATH": args.pyreft_pythonpath or ""}
            label = f"pyreft {spec['setting']['shape']}"
            result = run_worker([py, str(ROOT / "bench" / "pyreft_bench.py")], spec, env, label, args.worker_timeout)
            if result is not None:
                record["pyreft"].append({"setting": spec["setting"], **result})
                save()
    # a setting pyreft could not be run for this time falls back to the earlier measurement (marked merged_from)
    have = {json.dumps(r["setting"], sort_keys=True) for r in record["pyreft"] if "row" in r}
    record["pyreft"] += [r for r in record.pop("pyreft_earlier", []) if json.dumps(r["setting"], sort_keys=True) not in have]
    save()
    print_tables(record)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
