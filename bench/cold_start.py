"""Whole jobs through the two command lines, `loreft train` against `mlx_lm lora`, as a user runs them.

Each job is a fresh process on the same rows: a random-weight model of a public shape saved as an mlx-lm
folder (a byte-level tokenizer: one token per character), rows of exactly --seq tokens whose last quarter
(or all after --prompt tokens) is the completion (`--mask-prompt` for mlx-lm, so both train on the same targets), batch --batch, --steps steps.
For each job: wall time end to end (start to exit: load, compile, train, save), the process's GPU memory as
nvidia-smi reports it (peak, and at the end, just before exit), MLX's own active-memory peak, steady tokens/s
counted both ways (every token of the rows; supervised tokens only, which is what mlx-lm prints), and the
number of kernels in each job's MLX kernel folder (a cold job starts with an empty one).

    python bench/cold_start.py --plan cold --out cold.json            # cold then warm, both tools
    python bench/cold_start.py --plan speed --shape llama-3.2-1b --out s.json   # one job each, kernels kept
    python bench/cold_start.py --plan memory --out memory.json        # loreft's buffer-cache policies, and LoRA
    python bench/cold_start.py --plan checkpoint --out ckpt.json      # 2k and 4k tokens, recompute on and off
    python bench/cold_start.py --plan decode --out decode.json        # decode: adapter, base, mlx-lm's generate
    python bench/cold_start.py --plan ab --other ../old --out ab.json  # this checkout's jobs against another's, in turn
    python bench/cold_start.py --plan switch --steps 1000 --out sw.json  # cold: background compile, in-process, none

Needs an NVIDIA GPU for the memory figures (nvidia-smi); runs anywhere else with those left empty. mlx-lm runs as
its own command does, without loreft's set-up: on a Linux CPU that means MLX's bundled (slow) BLAS for it,
unless LOREFT_BENCH_LORA_FAST_BLAS=1 (then it gets the same fast BLAS as loreft).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
LORA_METRICS = "lora-metrics.jsonl"  # mlx-lm's train reports, written by lora_worker beside its adapter


# ---------------------------------------------------------------------------------------------------
# The model folder and the rows


def char_tokenizer(path: Path):
    """A byte-level tokenizer with no merges (one token per ASCII character) and a chat template that only joins
    the messages (then EOS after the assistant's), so mlx-lm's prompt/completion rows are loreft's rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(["a"], trainer=trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials),
                                                               special_tokens=specials, initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<|eos|>"
                          "{% endif %}{% endfor %}")
    fast.save_pretrained(str(path))
    return fast


def prepare(work: Path, shape: str, dtype: str, seq: int, rows: int, prompt: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(model folder, data folder) under work, built once; rows of seq tokens whose first `prompt` are the prompt."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from bench.shapes import SHAPES, build_model

    prompt = 3 * seq // 4 if prompt is None else prompt  # completion: seq - prompt tokens, its EOS included
    model_dir, data_dir = work / f"model-{shape}-{dtype}", work / f"data-{seq}-p{prompt}"
    if not (model_dir / "model.safetensors").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        tok = char_tokenizer(model_dir)
        config = {**SHAPES[shape], "torch_dtype": dtype, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        (model_dir / "config.json").write_text(json.dumps(config))
        model = build_model(shape, dtype, seed)
        mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    if not (data_dir / "train.jsonl").is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

        def row():
            text = "".join(rng.choice(letters, seq - 1))
            return json.dumps({"prompt": text[:prompt], "completion": text[prompt:]}) + "\n"

        (data_dir / "train.jsonl").write_text("".join(row() for _ in range(rows)))
        (data_dir / "valid.jsonl").write_text("".join(row() for _ in range(16)))
    return model_dir, data_dir


# ---------------------------------------------------------------------------------------------------
# Measuring one job


class GpuMemory:
    """nvidia-smi's memory.used of GPU 0 (MiB), sampled every interval seconds while a job runs."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _run(self):
        while not self._stop.is_set():
            value = self.read()
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self._stop.wait(self.interval)

    def __enter__(self):
        self.idle = self.read() if self.available else None
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def kernel_modules(folder: Path, since: float = 0.0) -> dict:
    """Files and distinct kernel modules in a kernel folder (loreft.background_compile.module_files), and when
    each module written after `since` (epoch s) appeared: the gaps between them show what each costs."""
    from loreft.background_compile import module_files

    modules = module_files(folder) if folder.is_dir() else {}
    first = {name: min(f.stat().st_mtime for f in files) for name, files in modules.items()}
    timeline = sorted((round(t - since, 2), n) for n, t in first.items() if t >= since)
    return {"files": sum(map(len, modules.values())), "modules": len(first), "names": sorted(first), "timeline": timeline}


PARTIAL: list[Path] = []  # where each finished job's row is appended (a run cut short keeps what it measured)


def run_job(label: str, cmd: list[str], env: dict, kernel_dir: Path | None, log_dir: Path) -> dict:
    """Run one job as its own process; wall time, nvidia-smi memory, and its log."""
    log = log_dir / f"{label}.log"
    print(f"== {label}: {' '.join(cmd[:4])} ...", flush=True)
    with GpuMemory() as mem, open(log, "w") as out:
        t0, started = time.perf_counter(), time.time()
        full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None: unset it for this job
        code = subprocess.run(cmd, env=full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        t1 = time.perf_counter()
    text = log.read_text()
    row = {"label": label, "returncode": code, "wall_s": round(t1 - t0, 2), "cmd": cmd, "env": env}
    if mem.samples:
        used, idle = [v for _, v in mem.samples], mem.idle or 0
        # at the end: the last sample while the process still held memory (MLX keeps it until the process is gone)
        end = next((v for v in reversed(used) if v > idle + 64), idle)
        row.update(gpu_idle_mib=mem.idle, gpu_peak_mib=max(used), gpu_end_mib=end,
                   process_peak_gb=(max(used) - idle) * 2**20 / 1e9, process_end_gb=(end - idle) * 2**20 / 1e9)
    if kernel_dir is not None:
        k = kernel_modules(kernel_dir, since=started)
        row.update(kernel_files=k["files"], kernel_modules=k["modules"], kernel_names=k["names"], kernel_timeline=k["timeline"])
    if code != 0:
        row["log_tail"] = text[-3000:]
    for path in PARTIAL:
        with open(path, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k not in ("kernel_names", "kernel_timeline")}) + "\n")
    print(f"   {label}: exit {code}, {row['wall_s']:.1f} s, nvidia-smi peak {row.get('process_peak_gb', float('nan')):.2f} GB, "
          f"end {row.get('process_end_gb', float('nan')):.2f} GB, kernels {row.get('kernel_modules')}", flush=True)
    return row


def loreft_results(adapter_dir: Path, warm_reports: int = 1) -> dict:
    """Steady tokens/s (reports after the first warm_reports, which hold the compile) and MLX's peak, from metrics.jsonl."""
    path = adapter_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steady = train[warm_reports:] or train
    mean = lambda key: sum(r.get(key, 0) for r in steady) / len(steady)  # noqa: E731
    return {"tokens_per_s_all": mean("tokens_per_sec"), "tokens_per_s_supervised": mean("supervised_tokens_per_sec"),
            "mlx_active_peak_gb": max(r["peak_memory_gb"] for r in train), "final_loss": train[-1]["loss"]}


def lora_results(adapter_dir: Path, batch: int, seq: int, warm_reports: int = 1) -> dict:
    """The same figures from mlx-lm's train reports (its tokens_per_second counts supervised tokens)."""
    path = adapter_dir / LORA_METRICS
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steady = rows[warm_reports:] or rows
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    return {"tokens_per_s_all": mean("iterations_per_second") * batch * seq,
            "tokens_per_s_supervised": mean("tokens_per_second"),
            "mlx_active_peak_gb": max(r["peak_memory"] for r in rows), "final_loss": rows[-1]["train_loss"]}


# ---------------------------------------------------------------------------------------------------
# The two commands


def loreft_cmd(model: Path, data: Path, adapter: Path, a, extra: list[str] = (), policy: str = "") -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data), "--adapter-dir", str(adapter), "--iters", str(a.steps),
            "--batch-size", str(a.batch), "--rank", "8", "--layers", "all", "--positions", "f7+l7",
            "--learning-rate", "1e-4", "--lr-schedule", "constant", "--warmup-ratio", "0", "--max-seq-length", str(a.seq),
            "--steps-per-report", str(a.report), "--steps-per-eval", "0", "--max-eval-batches", "1", "--dtype", a.dtype,
            *extra]
    return [PY, str(Path(__file__).resolve()), "--loreft-worker", policy or "default", "--", *args]


def lora_cmd(model: Path, data: Path, adapter: Path, a, extra: list[str] = ()) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "--lora-worker", "--", "--model", str(model), "--train", "--data", str(data), "--adapter-path", str(adapter),
            "--iters", str(a.steps), "--batch-size", str(a.batch), "--num-layers", "-1", "--learning-rate", "1e-4",
            "--max-seq-length", str(a.seq), "--mask-prompt", "--steps-per-report", str(a.report),
            "--steps-per-eval", "100000", "--val-batches", "1", "--save-every", "100000", *extra]


def loreft_worker(policy: str, args: list[str]) -> int:
    """`loreft train` in this process, with a policy: default (the library's), or '+'-joined changes to it:
    limit=<GB> or limit=none (loreft.bookkeeper.TRAINING_CACHE_LIMIT, MLX's cache of freed buffers while training;
    none: MLX's own limit), sync or trim (after each release of MLX's cache, synchronize, or trim the CUDA
    pool too; both print the pool's bytes), head-chunk=<logits> (loreft.loss.HEAD_CHUNK_ELEMENTS), plain-head (the
    LM head's loss as token_cross_entropy of the full head output, keeping its logits for the backward pass),
    eager (the step uncompiled throughout)."""
    import loreft.backend

    loreft.backend.setup()  # as the CLI does, before mlx.core is imported (main() below calls it again: no-op)

    from loreft.cli import main

    try:
        import datasets  # noqa: F401
    except ImportError:  # the CLI reads data through HF datasets, as users run it
        raise SystemExit("bench/cold_start.py: the HF `datasets` package is missing; carry its wheel (and pyarrow's) "
                         "to this machine") from None
    import loreft.bookkeeper
    import loreft.loss

    for change in policy.split("+"):
        name, _, value = change.partition("=")
        if name == "limit":
            loreft.bookkeeper.TRAINING_CACHE_LIMIT = None if value == "none" else int(float(value) * 1e9)
        elif name == "head-chunk":
            loreft.loss.HEAD_CHUNK_ELEMENTS = int(float(value))
        elif name == "plain-head":
            loreft.loss.head_cross_entropy = lambda head, h, t: loreft.loss.token_cross_entropy(head(h), t)
        elif name == "eager":  # the step uncompiled: MLX's prebuilt kernels, no fused ones to generate
            _uncompiled_step()
        elif name in ("sync", "trim"):  # after each release of MLX's cache: synchronize, or trim the CUDA pool
            _release_then(name)
        elif name != "default":
            raise SystemExit(f"bench/cold_start.py: unknown policy {change!r}")
    return main(args)


def _uncompiled_step() -> None:
    """Make train() run its step without mx.compile (LoopOptions.compiled=False)."""
    import dataclasses

    import loreft.trainer

    plain = loreft.trainer.train

    def train(*args, options=None, **kw):
        return plain(*args, options=dataclasses.replace(options or loreft.trainer.LoopOptions(), compiled=False), **kw)

    loreft.trainer.train = train


# MLX frees GPU buffers into the CUDA driver's default memory pool (cudaFreeAsync), which keeps them reserved for
# the process until a synchronize finds more than its release threshold held; what stays reserved is what
# nvidia-smi shows. MLX has no call to hand the pool's free memory back; the driver API does (cuMemPoolTrimTo).
_POOL_RESERVED, _POOL_USED = 5, 7  # CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_CURRENT


def _default_pool():
    """(the CUDA driver library, device 0's default memory pool handle), or None where there is no CUDA driver."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, pool = ctypes.c_int(), ctypes.c_void_p()
    if driver.cuDeviceGet(ctypes.byref(device), 0) or driver.cuDeviceGetDefaultMemPool(ctypes.byref(pool), device):
        return None
    return driver, pool


def pool_memory() -> dict | None:
    """Bytes the default CUDA memory pool of device 0 holds reserved and in use; None without CUDA."""
    import ctypes

    found = _default_pool()
    if found is None:
        return None
    driver, pool = found
    values = {}
    for name, attr in (("reserved", _POOL_RESERVED), ("used", _POOL_USED)):
        v = ctypes.c_uint64()
        if driver.cuMemPoolGetAttribute(pool, attr, ctypes.byref(v)):
            return None
        values[name] = v.value
    return values


def trim_memory_pool() -> bool:
    """Hand the default CUDA pool's unused memory back to the driver (after MLX's cache is cleared); True if done."""
    import ctypes

    import mlx.core as mx

    found = _default_pool()
    if found is None:
        return False
    driver, pool = found
    mx.synchronize()  # frees MLX queued on its streams complete first
    return driver.cuMemPoolTrimTo(pool, ctypes.c_size_t(0)) == 0


def _release_then(action: str) -> None:
    """Make loreft's release of MLX's cache also synchronize (sync) or trim the CUDA pool (trim), printing the pool's
    reserved and used bytes before and after each release (what nvidia-smi counts is the pool's reserve)."""
    import mlx.core as mx

    import loreft.bookkeeper
    import loreft.trainer

    plain = loreft.bookkeeper.release_cached_memory

    def release():
        before = pool_memory()
        plain()
        mx.synchronize()
        if action == "trim":
            trim_memory_pool()
        print(f"[{action}] pool before {before}, after {pool_memory()}, MLX active {mx.get_active_memory()}, "
              f"cache {mx.get_cache_memory()}", file=sys.stderr, flush=True)

    loreft.bookkeeper.release_cached_memory = loreft.trainer.release_cached_memory = release


def lora_worker(args: list[str]) -> int:
    """`mlx_lm lora` in this process (its own main), recording its train reports as JSON lines beside the adapter.

    LOREFT_BENCH_LORA_FAST_BLAS=1 gives it the fast BLAS that loreft uses on a Linux CPU (MLX's bundled
    BLAS is 10-30x slower there), for a comparison of the methods rather than of the BLAS libraries.
    """
    if os.environ.get("LOREFT_BENCH_LORA_FAST_BLAS") == "1":
        from loreft.blas import enable_fast_blas

        enable_fast_blas()  # before mlx.core loads
    import mlx_lm.lora as lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    path = Path(args[args.index("--adapter-path") + 1]) / LORA_METRICS

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(info) + "\n")

    lora.get_reporting_callbacks = lambda *a, **kw: Record()  # run() takes its callback from here
    sys.argv = ["mlx_lm.lora", *args]
    lora.main()
    return 0


# ---------------------------------------------------------------------------------------------------
# Plans


def loreft_kernel_home(cache_home: Path, empty: bool) -> tuple[Path, dict]:
    """(the kernel folder a `loreft train` job uses by default with cache_home as $XDG_CACHE_HOME, the environment
    that makes it find that folder by itself), cache_home emptied first when `empty`."""
    from loreft.backend import kernel_cache_root
    from loreft.cuda import kernel_cache_dir

    if empty:
        shutil.rmtree(cache_home, ignore_errors=True)
    kernels = cache_home / "mlx-loreft" / kernel_cache_dir().relative_to(kernel_cache_root())
    # this process's own set-up may have set MLX_PTX_CACHE_DIR, and a user LOREFT_CACHE: the job must find the
    # default under $XDG_CACHE_HOME by itself
    return kernels, {"XDG_CACHE_HOME": str(cache_home), "MLX_PTX_CACHE_DIR": None, "LOREFT_CACHE": None}


def plan_cold(a, model: Path, data: Path, work: Path, logs: Path, phases=("cold", "warm")) -> list[dict]:
    """Each tool cold (empty kernel folder), then warm (the folder its cold job filled).

    phases=("speed",): one job each with whatever the kernel folders hold (a cold plan run before, on any
    shape, fills most of them): the steady speed of another shape or supervision without two cold starts.
    """
    loreft_kernels, loreft_env = loreft_kernel_home(work / "cache-home", empty="cold" in phases)
    lora_kernels = work / "kernels-lora"
    if "cold" in phases:
        shutil.rmtree(lora_kernels, ignore_errors=True)
    lora_env = {"MLX_PTX_CACHE_DIR": str(lora_kernels)}
    rows = []
    for phase in phases:
        ad = work / f"adapter-loreft-{phase}"
        row = run_job(f"loreft-{phase}", loreft_cmd(model, data, ad, a), loreft_env, loreft_kernels, logs)
        rows.append({**row, **loreft_results(ad)})
        ad = work / f"adapter-lora-{phase}"
        row = run_job(f"lora-{phase}", lora_cmd(model, data, ad, a), lora_env, lora_kernels, logs)
        rows.append({**row, **lora_results(ad, a.batch, a.seq)})
    return rows


def plan_ab(a, model: Path, data: Path, work: Path, logs: Path) -> list[dict]:
    """`loreft train` of this checkout, then of another (a.other) and this one in turn (a.rounds each), all on one
    kernel folder, emptied first: the first job is a cold start, the rest compare the two versions' steady speed;
    then `mlx_lm lora` from an empty kernel folder of its own (the cold start to compare the first job with)."""
    kernels, env = loreft_kernel_home(work / "cache-home-ab", empty=True)
    other = str(Path(a.other).resolve() / "bench" / "cold_start.py")
    rows = []
    for i, which in enumerate(["this"] + ["other", "this"] * a.rounds):
        ad = work / f"adapter-ab-{i}-{which}"
        cmd = loreft_cmd(model, data, ad, a)
        if which == "other":
            cmd[1] = other  # that checkout's worker, which puts that checkout's loreft first on its path
        row = run_job(f"ab-{i}-{which}", cmd, env, kernels, logs)
        rows.append({**row, "version": which, **loreft_results(ad)})
    lora_kernels = work / "kernels-lora-ab"  # then LoRA from an empty folder: the cold start on the same machine
    shutil.rmtree(lora_kernels, ignore_errors=True)
    ad = work / "adapter-ab-lora"
    row = run_job("ab-lora-cold", lora_cmd(model, data, ad, a), {"MLX_PTX_CACHE_DIR": str(lora_kernels)}, lora_kernels, logs)
    rows.append({**row, "version": "lora", **lora_results(ad, a.batch, a.seq)})
    return rows


def plan_switch(a, model: Path, data: Path, work: Path, logs: Path) -> list[dict]:
    """loreft cold with its background compile (training starts uncompiled, then switches), then cold compiling in
    its own process first (LOREFT_BACKGROUND_COMPILE=0, as before the background compile), then the step uncompiled
    throughout: each from an emptied kernel folder."""
    rows = []
    modes = (("background", {}, "default"), ("foreground", {"LOREFT_BACKGROUND_COMPILE": "0"}, "default"),
             ("uncompiled", {}, "eager"))
    for label, env_extra, policy in [m for m in modes if m[0] in a.modes.split(",")]:
        kernels, env = loreft_kernel_home(work / f"cache-home-{label}", empty=True)
        env.update(env_extra)
        ad = work / f"adapter-switch-{label}"
        row = run_job(f"switch-{label}", loreft_cmd(model, data, ad, a, policy=policy), env, kernels, logs)
        rows.append({**row, "mode": label, **loreft_results(ad), **uncompiled_steps(logs / f"switch-{label}.log")})
    return rows


def uncompiled_steps(log: Path) -> dict:
    """What `loreft train` printed about its background compile (steps run uncompiled, modules kept)."""
    found = re.search(r"(\d+) steps ran uncompiled .*?\((\d+) kernel modules kept", log.read_text(errors="replace"))
    return {"uncompiled_steps": int(found[1]), "kernel_modules_moved": int(found[2])} if found else {}


def plan_memory(a, model: Path, data: Path, work: Path, logs: Path) -> list[dict]:
    """loreft under each buffer-cache policy (warm kernels), then mlx-lm LoRA, same job."""
    rows = []
    for policy in a.policies.split(","):
        ad = work / f"adapter-memory-{policy}"
        row = run_job(f"loreft-{policy}", loreft_cmd(model, data, ad, a, policy=policy), {}, None, logs)
        rows.append({**row, "policy": policy, **loreft_results(ad)})
    ad = work / "adapter-memory-lora"
    row = run_job("lora", lora_cmd(model, data, ad, a), {}, None, logs)
    rows.append({**row, **lora_results(ad, a.batch, a.seq)})
    return rows


def plan_checkpoint(a, work: Path, logs: Path) -> list[dict]:
    """Long rows: each tool with and without recomputing activations, at each length (same tokens per step)."""
    rows = []
    for seq in (int(s) for s in a.lengths.split(",")):
        b = argparse.Namespace(**{**vars(a), "seq": seq, "batch": max(1, a.tokens_per_step // seq)})
        model, data = prepare(work, a.shape, a.dtype, seq, b.batch * b.steps + 8)
        for on in (False, True):
            tag = f"{seq}-{'recompute' if on else 'keep'}"
            ad = work / f"adapter-ckpt-loreft-{tag}"
            row = run_job(f"loreft-{tag}", loreft_cmd(model, data, ad, b, ["--grad-checkpoint"] if on else []), {}, None, logs)
            rows.append({**row, "seq": seq, "batch": b.batch, "grad_checkpoint": on, **loreft_results(ad)})
            ad = work / f"adapter-ckpt-lora-{tag}"
            row = run_job(f"lora-{tag}", lora_cmd(model, data, ad, b, ["--grad-checkpoint"] if on else []), {}, None, logs)
            rows.append({**row, "seq": seq, "batch": b.batch, "grad_checkpoint": on,
                         **lora_results(ad, b.batch, seq)})
    return rows


def plan_decode(a, model: Path, adapter: Path, repeats: int, prompt_len: int, new_tokens: int) -> dict:
    """Greedy decode tokens/s, interleaved repeats: mlx-lm's stream_generate on the plain model (what `mlx_lm
    generate` prints), loreft's stream_responses without and with the adapter (its own model copy)."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    from loreft.adapter import load_adapter
    from loreft.generate import stream_responses

    plain, tokenizer = mlx_lm.load(str(model))
    adapted, _ = mlx_lm.load(str(model))
    reft = load_adapter(adapted, str(adapter))
    prompt = "".join(np.random.default_rng(1).choice(list("abcdefghij"), prompt_len))
    ids = tokenizer.encode(prompt)

    def mlx_lm_base():
        return list(mlx_lm.stream_generate(plain, tokenizer, ids, max_tokens=new_tokens))[-1]

    runs = {"mlx_lm generate, base": mlx_lm_base,
            "loreft, base (no adapter)": lambda: list(stream_responses(plain, tokenizer, ids, None, max_tokens=new_tokens))[-1],
            "loreft, adapter": lambda: list(stream_responses(adapted, tokenizer, ids, reft, max_tokens=new_tokens))[-1]}
    speeds = {k: [] for k in runs}
    tokens = {}
    for name, fn in runs.items():
        fn()  # warm up
    for _ in range(repeats):
        for name, fn in runs.items():
            r = fn()
            speeds[name].append(r.generation_tps)
            tokens[name] = r.generation_tokens
        mx.clear_cache()
    med = {k: float(np.median(v)) for k, v in speeds.items()}
    out = {"prompt_tokens": len(ids), "new_tokens": tokens, "repeats": repeats, "tokens_per_s": speeds, "median": med,
           "adapter_over_loreft_base": med["loreft, adapter"] / med["loreft, base (no adapter)"],
           "adapter_over_mlx_lm_base": med["loreft, adapter"] / med["mlx_lm generate, base"]}
    for k, v in med.items():
        print(f"   decode {k:<28} {v:8.1f} tok/s (median of {repeats})", flush=True)
    return out


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--loreft-worker":
        return loreft_worker(sys.argv[2], sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "--lora-worker":
        return lora_worker(sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", choices=["cold", "speed", "memory", "checkpoint", "decode", "ab", "switch"], required=True)
    p.add_argument("--work", default="/tmp/loreft-cold-start", help="models, data, adapters and kernel folders")
    p.add_argument("--shape", default="qwen2-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompt", type=int, default=None,
                   help="prompt tokens per row (default 3/4 of --seq: the last quarter supervised; 14 with f7+l7: about every token)")
    p.add_argument("--report", type=int, default=10, help="steps per report (the first report holds the compile)")
    p.add_argument("--policies", default="default,limit=none", help="memory plan: loreft's policies, comma-separated (default, or '+'-joined limit=<GB|none>, "
                   "head-chunk=<logits>, plain-head)")
    p.add_argument("--lengths", default="2048,4096", help="checkpoint plan: row lengths")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="checkpoint plan: batch = this / length")
    p.add_argument("--other", help="ab plan: another checkout of this repository (its bench/ and loreft/)")
    p.add_argument("--rounds", type=int, default=2, help="ab plan: jobs of each version after the first")
    p.add_argument("--modes", default="background,foreground,uncompiled", help="switch plan: which of its jobs")
    p.add_argument("--adapter", help="decode plan: adapter folder (default: the cold plan's warm loreft adapter)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.plan == "ab" and not (a.other and (Path(a.other) / "bench" / "cold_start.py").is_file()):
        p.error("--plan ab needs --other <a checkout of this repository> (with bench/cold_start.py)")
    work = Path(a.work)
    PARTIAL.append(Path(a.out + ".partial.jsonl"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, data = prepare(work, a.shape, a.dtype, a.seq, a.batch * a.steps + 8, a.prompt)
    print(f"prepared {model.name}, {data.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    result = {"plan": a.plan, "args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import mlx.core as mx

        result["mlx"] = mx.__version__
        result["device"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    if a.plan in ("cold", "speed"):
        result["rows"] = plan_cold(a, model, data, work, logs, ("cold", "warm") if a.plan == "cold" else ("speed",))
    elif a.plan == "memory":
        result["rows"] = plan_memory(a, model, data, work, logs)
    elif a.plan == "ab":
        result["rows"] = plan_ab(a, model, data, work, logs)
    elif a.plan == "switch":
        result["rows"] = plan_switch(a, model, data, work, logs)
    elif a.plan == "checkpoint":
        result["rows"] = plan_checkpoint(a, work, logs)
    else:
        result["decode"] = plan_decode(a, model, Path(a.adapter or work / "adapter-loreft-warm"), a.repeats, 128, 256)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
