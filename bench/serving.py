"""Serving throughput: `loreft serve` with an adapter vs `mlx_lm.server` on the same base model without one.

Each server runs in its own process on a random-weight model of a public shape (bench/shapes.py, with
the demo tokenizer's small vocabulary so nothing is downloaded) or on --model. N clients stream
/v1/completions at once (greedy, the same prompts and budget for every server); the result is output
tokens/s over the whole run (all clients' tokens / wall time from the first request to the last token)
and the median time to first token, at each concurrency. The servers run side by side and are measured in
interleaved rounds (each row is the median round), so a change in the machine's load hits all alike.

    python bench/serving.py                                  # llama-small, float32, 1/8/32 streams (CPU)
    python bench/serving.py --shape qwen2-0.5b --dtype bfloat16 --max-tokens 256   # on a GPU
    python -m bench --suite serve                            # the same, with the suite's defaults

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shapes import SHAPES  # noqa: E402

WORDS = "the model learns a small edit of its hidden states at a few prompt positions and nothing else".split()


def build_model(folder: Path, shape: str, dtype: str) -> Path:
    """A random-weight mlx-lm model folder of this shape (the demo tokenizer's vocabulary), stored in dtype."""
    import mlx.core as mx

    from loreft.demo import build_tiny_model

    cfg = dict(SHAPES[shape])
    extra = {k: v for k, v in cfg.items() if k not in ("model_type", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "intermediate_size", "vocab_size")}
    build_tiny_model(folder, model_type=cfg["model_type"], hidden_size=cfg["hidden_size"],
                     num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                     intermediate_size=cfg["intermediate_size"], seed=0, **extra)
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_adapter(model_dir: Path, folder: Path, layers: str, positions: str, rank: int) -> Path:
    """A LoReFT adapter with random (non-trivial) weights for this model."""
    import mlx.core as mx
    import mlx_lm

    from loreft import ReftConfig, attach
    from loreft.adapter import save_adapter

    model, _ = mlx_lm.load(str(model_dir))
    reft = attach(model, ReftConfig(layers=layers, rank=rank, positions=positions))
    mx.random.seed(1)
    reft.load_parameters({k: 0.1 * mx.random.normal(v.shape) for k, v in reft.parameters().items()})
    save_adapter(reft, folder, base_model=str(model_dir), extra={"formatting": None})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start in time")


def stream_one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming /v1/completions request: start, first-token and end times, tokens received."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, first, chunks, usage = time.perf_counter(), None, 0, None
    for attempt in range(20):  # a server with a short listen backlog resets some of many simultaneous connects
        try:
            response = urllib.request.urlopen(request, timeout=3600)
            break
        except (ConnectionResetError, ConnectionRefusedError, urllib.error.URLError):
            if attempt == 19:
                raise
            time.sleep(0.05 * (attempt + 1))
    with response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                first = first or time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(), "tokens": tokens}


def load(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    """All prompts streamed at once, one thread each."""
    results: list = [None] * len(prompts)

    def run(i):
        results[i] = stream_one(url, model, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a client failed")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"streams": len(prompts), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_median_s": round(statistics.median(r["first"] - r["start"] for r in results), 4),
            "ttft_max_s": round(max(r["first"] - r["start"] for r in results), 4),
            "all_full_length": all(r["tokens"] == max_tokens for r in results)}


def start_server(cmd: list[str]) -> tuple[str, subprocess.Popen]:
    """Start a server on a free port; (base URL, process) once it answers."""
    port = free_port()
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:
        proc.kill()
        raise
    return url, proc


def measure(targets: list[tuple[str, str, str]], concurrency: list[int], prompts: list[str], max_tokens: int,
            rounds: int) -> list[dict]:
    """Each (name, url, model) at each concurrency, interleaved round by round; the median round of each.

    Interleaving spreads any drift in the machine's load over every server alike.
    """
    for _, url, model in targets:
        load(url, model, prompts[:2], 8)  # warm-up: compile paths, caches
    samples = {(name, n): [] for name, _, _ in targets for n in concurrency}
    for r in range(rounds):
        for n in concurrency:
            for name, url, model in targets:
                row = load(url, model, prompts[:n], max_tokens)
                samples[name, n].append(row)
                print(f"round {r + 1}: {name:24s} {n:3d} streams: {row['tokens_per_s']:9.1f} tok/s, "
                      f"TTFT median {row['ttft_median_s']:.3f} s", file=sys.stderr, flush=True)
    runs = []
    for name, _, _ in targets:
        rows = []
        for n in concurrency:
            ordered = sorted(samples[name, n], key=lambda row: row["tokens_per_s"])
            rows.append({**ordered[len(ordered) // 2], "rounds_tokens_per_s": [row["tokens_per_s"] for row in samples[name, n]]})
        runs.append({"server": name, "rows": rows})
    return runs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/serving.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-small", choices=sorted(SHAPES))
    p.add_argument("--model", help="an mlx-lm model folder to serve instead of a random one of --shape")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="stored and served dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of simultaneous streams")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--prompt-words", type=int, default=48, help="words per prompt (about 1-2 tokens each)")
    p.add_argument("--layers", default="all", help="adapter layers")
    p.add_argument("--positions", default="f7+l7", help="adapter positions")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row is the median round")
    p.add_argument("--skip-mlx-lm", action="store_true", help="only loreft serve")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    from loreft.backend import setup

    setup()  # the project's backend settings, before mlx.core loads
    import mlx.core as mx

    on_gpu = mx.default_device() == mx.gpu
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    concurrency = [int(n) for n in args.concurrency.split(",")]
    # a different word order per prompt: no two share a prefix for a server's prompt cache to reuse
    prompts = [" ".join(random.Random(i).choices(WORDS, k=args.prompt_words)) for i in range(max(concurrency))]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "model", args.shape, dtype)
        adapter = build_adapter(model_dir, Path(tmp) / "adapter", args.layers, args.positions, args.rank)
        ours = [sys.executable, "-m", "loreft.cli", "serve", "--model", str(model_dir), "--adapter", f"bench={adapter}",
                "--dtype", dtype, "--max-batch", str(max(32, max(concurrency)))]
        # mlx_lm.server gets the same loreft.backend.setup() as loreft serve (fast BLAS on Linux CPUs, the
        # CUDA graph size), so the two differ only in how they serve
        theirs = [sys.executable, "-c", "import loreft.backend; loreft.backend.setup(); import mlx_lm.server as s; s.main()",
                  "--model", str(model_dir), "--decode-concurrency", str(max(32, max(concurrency)))]
        servers = []
        try:
            url, proc = start_server(ours)
            servers.append(proc)
            targets = [("loreft serve + adapter", url, "bench"), ("loreft serve, base", url, str(model_dir))]
            if not args.skip_mlx_lm:
                url, proc = start_server(theirs)
                servers.append(proc)
                targets.append(("mlx_lm.server, base", url, str(model_dir)))
            runs = measure(targets, concurrency, prompts, args.max_tokens, args.rounds)
        finally:
            for proc in servers:
                proc.terminate()
            for proc in servers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    reference = {r["streams"]: r["tokens_per_s"] for r in runs[-1]["rows"]}
    ratio = {str(r["streams"]): round(r["tokens_per_s"] / reference[r["streams"]], 3) for r in runs[0]["rows"]}
    result = {
        "benchmark": "serving", "command": " ".join(["python bench/serving.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": "gpu" if on_gpu else "cpu",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": args.model or f"random {args.shape} (vocab of the demo tokenizer)", "dtype": dtype,
        "adapter": {"layers": args.layers, "positions": args.positions, "rank": args.rank},
        "max_tokens": args.max_tokens, "runs": runs,
        "adapter_vs_reference": {"reference": runs[-1]["server"], "tokens_per_s_ratio": ratio},
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
