"""MLX side of the benchmark: our LoReFT step, mlx-lm's LoRA step, diagnostics, decode, matmul peak.

Run by `python -m bench` as a worker process (so each one can choose its BLAS before MLX loads):
    python -m bench.mlx_bench SPEC.json RESULT.json
Every method trains the same random-weight model shape on the same tokens; runners are built (and
compiled, and warmed up) first, then timed in interleaved rounds, so a noisy CPU hits them alike.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


if __name__ == "__main__":  # a worker process: set the backend up before mlx.core loads
    from loreft.backend import setup

    FAST_BLAS = setup()["fast_blas"]  # honours LOREFT_NO_FAST_BLAS=1
else:
    FAST_BLAS = None

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from bench.levers import apply_function, loop_options
from bench.shapes import SHAPES, build_model, every_token_inputs, train_flops_per_token

LR = 1e-4  # any small rate: the step's cost does not depend on it


@dataclass
class Setting:
    """What every method shares in one comparison."""

    shape: str
    batch: int
    seq: int  # model input length; the batch trains batch * seq tokens per step
    dtype: str
    rank: int = 8
    positions: str = "f7+l7"
    data: str = "all"  # "all": loss on every token, edits at f7+l7 of the whole sequence; "completion": last quarter supervised
    warmup: int = 2
    steps: int = 5
    rounds: int = 3
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclass
class Runner:
    name: str
    step: Callable[[], None]  # one synchronized training step
    static_bytes: int  # what the method keeps between steps: weights, adapter, optimizer state
    trainable: int
    note: str = ""
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def make_tokens(s: Setting) -> np.ndarray:
    vocab = SHAPES[s.shape]["vocab_size"]
    return np.random.default_rng(s.seed).integers(0, vocab, (s.batch, s.seq + 1), dtype=np.int64).astype(np.int32)


def prompt_length(s: Setting) -> int:
    return s.seq if s.data == "all" else (3 * s.seq) // 4


# ---------------------------------------------------------------------------------------------------
# Runners


def loreft_runner(s: Setting, name: str, off=(), layers="all", positions=None, rank=None, clear_cache=False) -> Runner:
    """Our step exactly as loreft.trainer.train builds and calls it (make_step), with the named levers switched off."""
    from loreft import ReftConfig, TrainConfig, attach
    from loreft.blas import cores_shared_by
    from loreft.data import Batch
    from loreft.loss import batch_arrays
    from loreft.trainer import make_optimizer, make_step, row_shards

    model = build_model(s.shape, s.dtype, s.seed)
    if layers == "last":
        layers = [len(model.layers) - 1]
    reft = attach(model, ReftConfig(layers=layers, rank=rank or s.rank, positions=positions or s.positions, intervention="loreft"))
    cfg = TrainConfig(learning_rate=LR, lr_schedule="constant", warmup_ratio=0.0, batch_size=s.batch, iters=1000)
    optimizer = make_optimizer(cfg, 1000)
    optimizer.init(model.trainable_parameters())
    tokens = make_tokens(s)
    B, P = s.batch, prompt_length(s)
    options = loop_options(off)
    n = row_shards(options)  # the rows' split over CPU streams, as train() stages them
    if s.data == "all":  # loss on every token; not expressible as a prompt/completion Batch
        shards = every_token_inputs(reft, tokens, n)
    else:
        batch = Batch(tokens=tokens, prompt_lengths=np.full(B, P, np.int32), lengths=np.full(B, s.seq + 1, np.int32))
        shards = [batch_arrays(reft, part) for part in batch.split(n)]
    model.train()
    reft.set_apply(apply_function(off))
    step_fn, state = make_step(reft, optimizer, cfg, options=options)

    def step():
        with cores_shared_by(len(shards)):  # as train() runs its steps
            loss, *counts, _ = step_fn(shards, None, True)
            mx.eval(state, loss, counts)
        if clear_cache:
            mx.clear_cache()

    static = nbytes(model.parameters()) + nbytes(optimizer.state)
    trainable = reft.stats().trainable
    note = f"layers={layers} positions={positions or s.positions}" + (f" levers off: {','.join(off)}" if off else "")
    return Runner(name, step, static, trainable, note)


def lora_runner(s: Setting, name: str = "mlx-lm LoRA") -> Runner:
    """mlx-lm's LoRA (rank 8, every linear of every block) with its own loss and compiled step."""
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build_model(s.shape, s.dtype, s.seed)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": s.rank, "scale": 20.0, "dropout": 0.0})
    model.train()
    optimizer = optim.Adam(learning_rate=LR)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def train_step(batch, lengths):  # mlx_lm.tuner.trainer.train's step (one process, no accumulation)
        (value, ntoks), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return value, ntoks

    compiled = mx.compile(train_step, inputs=state, outputs=state)
    tokens = mx.array(make_tokens(s))
    P = prompt_length(s)
    # mlx-lm's lengths rows are (offset, length): targets t with offset <= t + 1 <= length are supervised
    lengths = mx.array([[0 if s.data == "all" else P, s.seq + 1]] * s.batch)

    def step():
        value, ntoks = compiled(tokens, lengths)
        mx.eval(state, value, ntoks)

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return Runner(name, step, nbytes(model.parameters()) + nbytes(optimizer.state), trainable, "rank 8, all linears of all blocks")


def forward_runner(s: Setting, name: str = "forward only") -> Runner:
    """Diagnostic: the base model's forward pass and loss, no gradient (a lower bound on any step)."""
    from loreft.loss import completion_loss

    model = build_model(s.shape, s.dtype, s.seed)
    model.freeze()
    tokens = mx.array(make_tokens(s))
    mask = mx.ones((s.batch, s.seq))
    fn = mx.compile(lambda t, m: completion_loss(model, t, m))

    def step():
        mx.eval(fn(tokens, mask))

    return Runner(name, step, nbytes(model.parameters()), 0, "base model forward + loss, no backward")


# ---------------------------------------------------------------------------------------------------
# Measurement


def measure(runners: list[Runner], s: Setting, log=print) -> None:
    """Warm each runner up, then time s.rounds interleaved rounds of s.steps synchronized steps each."""
    for r in runners:
        t0 = time.perf_counter()
        for _ in range(s.warmup):
            r.step()
        log(f"  warmed up {r.name} ({time.perf_counter() - t0:.1f} s)")
    for _ in range(s.rounds):
        for r in runners:
            for _ in range(s.steps):
                before = mx.get_active_memory()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                r.step()
                r.times.append(time.perf_counter() - t0)
                # memory held by the other runners' resident models does not count against this one
                r.peaks.append(mx.get_peak_memory() - (before - r.static_bytes))


def summarize(r: Runner, s: Setting, peak_flops: float) -> dict:
    t = float(np.median(r.times))
    tps = s.tokens_per_step / t
    flops = train_flops_per_token(SHAPES[s.shape], s.seq)
    return {
        "method": r.name, "note": r.note, "step_s": t, "step_s_min": float(np.min(r.times)),
        "step_s_max": float(np.max(r.times)), "tokens_per_s": tps, "peak_memory_gb": float(np.max(r.peaks)) / 1e9,
        "trainable_params": r.trainable, "model_flops_per_token": flops,
        "utilization": tps * flops / peak_flops if peak_flops else None, "timed_steps": len(r.times),
    }


def matmul_peak(dtype: str, n: int, iters: int) -> float:
    """FLOP/s of an n x n x n matmul in this dtype (median of iters, rotating among 3 input pairs)."""
    dt = getattr(mx, dtype)
    pairs = [(mx.random.normal((n, n)).astype(dt), mx.random.normal((n, n)).astype(dt)) for _ in range(3)]
    mx.eval(pairs)
    for a, b in pairs:
        mx.eval(a @ b)
    times = []
    for i in range(iters):
        a, b = pairs[i % 3]
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def decode_speed(s: Setting, prompt_len: int, new_tokens: int, rounds: int, log=print) -> dict:
    """Greedy decode tokens/s: plain mlx-lm model vs the same weights with a LoReFT adapter (loreft.generate)."""
    from mlx_lm.generate import generate_step

    from loreft import ReftConfig, attach
    from loreft.generate import editing

    plain = build_model(s.shape, s.dtype, s.seed)
    adapted = build_model(s.shape, s.dtype, s.seed)
    reft = attach(adapted, ReftConfig(layers="all", rank=s.rank, positions=s.positions, intervention="loreft"))
    prompt = mx.array(make_tokens(s)[0, :prompt_len])

    def run(model, r) -> tuple[float, list[int]]:
        ctx = editing(model, r, r.locations([prompt_len]) if r else None)
        with ctx:
            gen = generate_step(prompt, model, max_tokens=new_tokens)
            first, _ = next(gen)
            t0 = time.perf_counter()
            out = [first] + [tok for tok, _ in gen]
            dt = time.perf_counter() - t0
        return (len(out) - 1) / dt, out

    speeds = {"base": [], "adapter": []}
    run(plain, None), run(adapted, reft)  # warm-up
    for _ in range(rounds):
        speeds["base"].append(run(plain, None)[0])
        speeds["adapter"].append(run(adapted, reft)[0])
    base, adapter = float(np.median(speeds["base"])), float(np.median(speeds["adapter"]))
    log(f"  decode: base {base:.1f} tok/s, adapter {adapter:.1f} tok/s")
    return {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "base_tokens_per_s": base,
            "adapter_tokens_per_s": adapter, "adapter_over_base": adapter / base}


RUNNER_KINDS = {"loreft": loreft_runner, "lora": lora_runner, "forward": forward_runner}


def run_spec(spec: dict, log=print, save=lambda result: None) -> dict:
    """Run every comparison a spec lists; return the results (see bench/__main__.py for the spec).

    save(result) is called after each comparison, so a run cut short still leaves what it measured.
    """
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    out = {"device": device, "fast_blas": FAST_BLAS, "mlx": mx.__version__, "comparisons": []}
    peak_dtype = spec.get("peak_dtype", "float32")
    n = spec.get("peak_n", 1024)
    out["matmul_peak_flops"] = matmul_peak(peak_dtype, n, spec.get("peak_iters", 10))
    out["matmul_peak"] = {"dtype": peak_dtype, "n": n}
    log(f"  matmul {n}^3 {peak_dtype}: {out['matmul_peak_flops'] / 1e12:.3f} TFLOP/s")
    for comp in spec["comparisons"]:
        s = Setting(**comp["setting"])
        log(f"[{s.shape} {s.dtype} batch {s.batch} x {s.seq} data={s.data}]")
        runners = []
        for r in comp["runners"]:
            kind, name, kw = r["kind"], r["name"], r.get("kwargs", {})
            t0 = time.perf_counter()
            try:
                runners.append(RUNNER_KINDS[kind](s, name, **kw))
            except Exception as e:  # report, keep going with the others
                log(f"  {name}: FAILED to build ({type(e).__name__}: {e})")
                continue
            log(f"  built {name} ({time.perf_counter() - t0:.1f} s)")
        measure(runners, s, log)
        rows = [summarize(r, s, out["matmul_peak_flops"]) for r in runners]
        for row in rows:
            log(f"  {row['method']:<28} {row['tokens_per_s']:>10.0f} tok/s  {row['step_s'] * 1e3:8.1f} ms  "
                f"{row['peak_memory_gb']:.3f} GB")
        result = {"setting": comp["setting"], "rows": rows}
        if comp.get("decode"):
            try:
                result["decode"] = decode_speed(s, **comp["decode"], log=log)
            except Exception as e:
                log(f"  decode FAILED ({type(e).__name__}: {e})")
        out["comparisons"].append(result)
        save(out)
        del runners
        gc.collect()
        mx.clear_cache()
    return out


def main(argv: list[str]) -> None:
    spec_path, result_path = argv
    spec = json.loads(open(spec_path).read())
    if spec.get("device") == "cpu":
        mx.set_default_device(mx.cpu)
    def save(result: dict) -> None:
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)

    save(run_spec(spec, log=lambda m: print(m, flush=True), save=save))


if __name__ == "__main__":
    main(sys.argv[1:])
