"""Data-parallel scaling of `loreft.trainer.train`: tokens/s on 1 and N GPUs, same global batch.

Every run goes through the real training loop (compiled step, all-reduce inside it, reports, final
save) on a random-weight model of a public shape (bench/shapes.py), so nothing is downloaded.
1 GPU is a plain process; N GPUs is `mlx.launch --backend nccl --hosts 127.0.0.1 -n N`, which gives
rank r the GPU CUDA_VISIBLE_DEVICES=r (MLX's nccl backend then uses the one GPU it sees).

    python bench/distributed.py                       # qwen2-0.5b, bf16, global batch 16 x 512, 1 and 2 GPUs
    python bench/distributed.py --gpus 1,2,4 --steps 40
    python bench/distributed.py --batch-per-gpu 16   # weak scaling: 16 rows on each GPU (global 16 x N)
    python bench/distributed.py --batch-per-gpu 32   # the setting that meets the 1.8x-on-2-GPUs target
    python bench/distributed.py --backend ring --shape llama-small --dtype float32 --batch 4 --seq 128 \
        --steps 6 --warmup 2 --gpus 1,2               # the mechanics on a CPU-only machine

Scaling efficiency on N GPUs = tokens/s(N) / (N x tokens/s(1)). By default every run trains the same
global batch (strong scaling: each of N GPUs gets 1/N of it); --batch-per-gpu keeps each GPU's share
fixed instead (weak scaling, the usual figure for data parallelism). Results: JSON at --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/distributed.py` from anywhere: loreft and bench import


def worker(a: argparse.Namespace) -> None:
    """One rank: train a.warmup + a.steps steps; rank 0 writes the measurement to a.result."""
    from loreft.backend import setup

    setup()  # first: the fast BLAS on a Linux CPU, the CUDA graph size on a GPU
    import mlx.core as mx
    import numpy as np

    from bench.shapes import SHAPES, build_model, train_flops_per_token
    from loreft import ReftConfig, TrainConfig, attach
    from loreft.data import Example
    from loreft.reporting import Callback
    from loreft.trainer import LoopOptions, train

    try:
        import matplotlib  # noqa: F401  (loss.png beside the adapter; the GPU image may lack it)
        plot = LoopOptions.plot
    except ImportError:
        plot = None
    # stop_vote off measures what the per-step stop vote costs: such a run cannot be stopped
    options = LoopOptions(queue_ahead=a.queue_ahead, stage_steps=a.stage_steps, stop_vote=bool(a.stop_vote), plot=plot)
    world = mx.distributed.init()
    model = build_model(a.shape, a.dtype)
    reft = attach(model, ReftConfig(layers="all", rank=a.rank, positions=a.positions, seed=0))
    # the trainer counts sequence lengths: a.seq tokens per row, the last quarter supervised
    rng, vocab = np.random.default_rng(0), SHAPES[a.shape]["vocab_size"]
    prompt = (3 * a.seq) // 4
    examples = [Example(rng.integers(1, vocab, prompt).tolist(), rng.integers(1, vocab, a.seq - prompt).tolist())
                for _ in range(a.batch * 4)]
    cfg = TrainConfig(learning_rate=1e-4, lr_schedule="constant", warmup_ratio=0.0, batch_size=a.batch,
                      iters=a.warmup + a.steps, steps_per_report=a.warmup, steps_per_eval=0, save_every=0,
                      seed=0, dtype=a.dtype)

    class Clock(Callback):
        def __init__(self):
            self.rows, self.at = [], {}

        def on_step(self, step, total):
            self.at[step] = time.perf_counter()

        def on_report(self, m):
            self.rows.append(m)

    clock = Clock()
    with tempfile.TemporaryDirectory() as adapter_dir:
        summary = train(reft, examples, None, cfg, adapter_dir, callbacks=[clock], group=world, options=options)
    if world.rank() != 0:
        return
    # wall clock over the timed steps (everything the loop does), after the warmup that compiles
    seconds = clock.at[a.warmup + a.steps] - clock.at[a.warmup]
    tps = a.steps * a.batch * a.seq / seconds
    # the trainer's own figure, from its reports: the same tokens over its per-step times (step and sync only)
    window = a.warmup * a.batch * a.seq
    timed = [r for r in clock.rows if r["step"] > a.warmup]
    result = {
        "world": world.size(), "global_batch": a.batch, "tokens_per_sec": tps, "step_s": seconds / a.steps,
        "tokens_per_sec_trainer": window * len(timed) / sum(window / r["tokens_per_sec"] for r in timed),
        "model_tflops": tps * train_flops_per_token(SHAPES[a.shape], a.seq) / 1e12,
        "peak_memory_gb_rank0": max(r["peak_memory_gb"] for r in clock.rows),
        "losses": [r["loss"] for r in clock.rows], "train_time_s": summary["train_time_s"],
        "device": str(mx.default_device()), "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "mlx": mx.__version__, "graph_ops": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),  # loreft.backend.setup() sets it on CUDA
    }
    Path(a.result).write_text(json.dumps(result))


def launch(a: argparse.Namespace, n: int, result: Path) -> dict:
    """Run the worker on n GPUs (a plain process for n == 1) and read rank 0's result."""
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--result", str(result)] + a.passthrough
    if n == 1:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        cmd = args
    else:
        env = dict(os.environ)
        launcher = Path(sys.executable).with_name("mlx.launch")
        head = [str(launcher)] if launcher.exists() else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
        cmd = head + ["--backend", a.backend, "--hosts", "127.0.0.1", "-n", str(n), "--"] + args
    tic = time.perf_counter()
    out = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    if not result.exists():  # mlx.launch exits 0 even when a rank failed
        raise SystemExit(f"{n}-process run failed:\n{(out.stdout + out.stderr)[-4000:]}")
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - tic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step, all ranks together)")
    p.add_argument("--batch-per-gpu", type=int, default=0, help="rows per GPU per step; the global batch is this x GPUs (weak scaling)")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--positions", default="f7+l7")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing; also the report window")
    p.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of --warmup)")
    p.add_argument("--gpus", default="1,2", help="process counts to run, e.g. 1,2,4")
    p.add_argument("--queue-ahead", type=int, default=1, help="LoopOptions.queue_ahead (0: read each loss before queuing the next step)")
    p.add_argument("--stage-steps", type=int, default=32, help="LoopOptions.stage_steps (steps whose inputs are uploaded together)")
    p.add_argument("--stop-vote", type=int, default=1, help="0: skip the per-step stop vote of several processes (to measure its cost)")
    p.add_argument("--backend", default="nccl", help="mlx.launch backend for runs on more than one process")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps % a.warmup:
        p.error("--steps must be a multiple of --warmup (the report window)")
    if a.stage_steps < 1:
        p.error("--stage-steps must be >= 1 (steps whose inputs are uploaded together)")
    if a.worker:
        return worker(a)
    counts = [int(n) for n in a.gpus.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            if a.batch_per_gpu:
                a.batch = a.batch_per_gpu * n
            a.passthrough = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("shape", "dtype", "batch", "seq", "rank", "positions", "warmup", "steps", "queue_ahead", "stage_steps", "stop_vote")]
            runs[n] = launch(a, n, Path(tmp) / f"result-{n}.json")
            print(f"{n} GPU(s): {runs[n]['tokens_per_sec']:,.0f} tokens/s, {runs[n]['step_s'] * 1e3:.1f} ms/step, "
                  f"peak {runs[n]['peak_memory_gb_rank0']:.1f} GB on rank 0", flush=True)
    base = runs[counts[0]]["tokens_per_sec"] / counts[0]
    print(f"\n{'GPUs':>4} {'tokens/s':>12} {'speedup':>8} {'efficiency':>10}")
    for n in counts:
        tps = runs[n]["tokens_per_sec"]
        runs[n]["speedup"] = tps / (base * counts[0])
        runs[n]["efficiency"] = tps / (base * n)
        print(f"{n:>4} {tps:>12,.0f} {runs[n]['speedup']:>8.2f} {runs[n]['efficiency']:>10.1%}")
    setting = {k: getattr(a, k) for k in ("shape", "dtype", "batch", "batch_per_gpu", "seq", "rank", "positions", "warmup", "steps", "backend", "queue_ahead", "stage_steps", "stop_vote")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"setting": setting, "runs": {str(n): r for n, r in runs.items()}}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
