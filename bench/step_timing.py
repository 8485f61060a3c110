"""Where a training step's time goes: host work to queue it against the device's time to run it.

For the step `loreft.trainer.train` runs (built by `make_step`), on a random-weight model of a public shape:
  prep   host time to build the step's inputs from a Batch (locations, supervised positions, the upload:
         LoopOptions.stage_steps steps at once as train() does; --inputs per-step makes six arrays every step)
  trace  host time of the compiled step's call (replaying the graph)
  queue  host time of mx.async_eval (encoding every kernel, and collectives, for the device)
  step   wall time per step with --steps steps queued back to back (the device's pace unless the host's is slower)
  lockstep  wall time per step when each step's loss is read before the next is queued
  cpu    the process's CPU seconds per step (queued run): on a machine other jobs share, a steadier measure of
         the work than wall time (with MKL_NUM_THREADS=1 it leaves out the BLAS threads' spin-waiting)
A step whose prep + trace + queue is close to `step` is host-bound: a faster device would not help it.
Runs under `mlx.launch` too (each rank reports its own numbers; the step then all-reduces gradients).

    python bench/step_timing.py --batch 8 --seq 512
    python bench/step_timing.py --batch 8 --off stacked_groups   # the step with one lever off
    mlx.launch --backend nccl --hosts 127.0.0.1 -n 2 -- python bench/step_timing.py --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8, help="rows per rank")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", choices=["completion", "all"], default="completion",
                   help="completion: the last quarter of each row supervised; all: every token, edits at f7+l7 of the row "
                        "(as the benchmark suite's main setting)")
    p.add_argument("--layers", default="all", help='"0": one intervention, at the bottom: about the base model\'s own step')
    p.add_argument("--inputs", choices=["staged", "per-step", "reuse"], default="staged",
                   help="staged: uploaded LoopOptions.stage_steps steps at a time, as train() does; per-step: six arrays "
                        "made every step; reuse: made once (no upload at all)")
    p.add_argument("--cpu-streams", type=int, default=None, help="on a CPU: streams a step's rows are split over "
                   "(default: the trainer's, LoopOptions.cpu_streams)")
    p.add_argument("--off", default="", help="speed levers switched off, comma-separated (bench/levers.py), e.g. "
                   "stacked_groups: the same run measures the step with and without them")
    a = p.parse_args()

    from loreft.backend import setup

    setup()  # first: the fast BLAS on a Linux CPU, the CUDA graph size on a GPU
    import mlx.core as mx
    import numpy as np

    from bench.shapes import SHAPES, build_model, every_token_inputs
    from loreft import ReftConfig, TrainConfig, attach
    from loreft.data import Batch
    from loreft.blas import cores_shared_by
    from loreft.loss import batch_arrays
    from loreft.trainer import LoopOptions, make_optimizer, make_step, row_shards, staged

    world = mx.distributed.init()
    model = build_model(a.shape, a.dtype)
    reft = attach(model, ReftConfig(layers=a.layers, rank=8, positions="f7+l7"))
    cfg = TrainConfig(learning_rate=1e-4, lr_schedule="constant", warmup_ratio=0.0, batch_size=a.batch, iters=1000)
    optimizer = make_optimizer(cfg, 1000)
    optimizer.init(model.trainable_parameters())
    from bench.levers import apply_function, loop_options

    off = [name for name in a.off.split(",") if name]
    options = loop_options(off)
    if a.cpu_streams is not None:
        options.cpu_streams = a.cpu_streams
    reft.set_apply(apply_function(off))
    step_fn, state = make_step(reft, optimizer, cfg, world, options)
    shards = row_shards(options, world.size())  # on a CPU the rows run on streams of their own, as in train()
    rng = np.random.default_rng(world.rank())
    tokens = rng.integers(1, SHAPES[a.shape]["vocab_size"], (a.batch, a.seq + 1)).astype(np.int32)
    batch = Batch(tokens=tokens, prompt_lengths=np.full(a.batch, 3 * a.seq // 4, np.int32),
                  lengths=np.full(a.batch, a.seq + 1, np.int32))
    model.train()

    def run(n: int, lockstep: bool) -> dict:
        spent = {"prep": 0.0, "trace": 0.0, "queue": 0.0}
        losses = []
        mx.synchronize()
        start, cpu_start = time.perf_counter(), sum(os.times()[:2])
        uploaded = []
        for _ in range(n):
            t0 = time.perf_counter()
            if a.data == "all":  # not a prompt/completion Batch: made once, as bench/mlx_bench.py does
                arrays = every_token
            elif a.inputs == "staged":
                uploaded = uploaded or [inputs for _, inputs in staged(enumerate([batch] * LoopOptions.stage_steps), reft,
                                                                        LoopOptions.stage_steps, shards)]
                arrays = uploaded.pop()
            else:
                arrays = fixed if a.inputs == "reuse" else [batch_arrays(reft, part) for part in batch.split(shards)]
            t1 = time.perf_counter()
            *results, _ = step_fn(arrays, None, True)
            t2 = time.perf_counter()
            mx.async_eval(state, results)
            t3 = time.perf_counter()
            spent["prep"] += t1 - t0
            spent["trace"] += t2 - t1
            spent["queue"] += t3 - t2
            losses.append(results[0])
            if lockstep:
                results[0].item()
        mx.eval(losses)
        wall, cpu = time.perf_counter() - start, sum(os.times()[:2]) - cpu_start
        return {k: 1e3 * v / n for k, v in spent.items()} | {"step": 1e3 * wall / n, "cpu": 1e3 * cpu / n}

    every_token = every_token_inputs(reft, tokens, shards)
    fixed = [batch_arrays(reft, part) for part in batch.split(shards)]
    mx.eval(fixed)
    with cores_shared_by(shards):  # as train() runs its steps: the streams' matmuls share the cores
        run(3, True)  # compile and warm up
        queued, lockstep = run(a.steps, False), run(a.steps, True)
    row = {"rank": world.rank(), "world": world.size(), "batch": a.batch, "seq": a.seq, "layers": a.layers,
           "inputs": a.inputs, "data": a.data, "off": off, "graph_ops": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),
           "queued_ms": {k: round(v, 2) for k, v in queued.items()}, "lockstep_ms": round(lockstep["step"], 2),
           "tokens_per_sec_per_rank": round(a.batch * a.seq / queued["step"] * 1e3)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
