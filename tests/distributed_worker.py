"""One rank of tests/test_distributed.py: train a tiny ReFT under mx.distributed and record what this rank saw.

Run by `mlx.launch ... -- python tests/distributed_worker.py MODEL OUT SCENARIOS` (every rank), or as one
plain process for the single-process reference. Each rank gets its own adapter folder, as if each had a
disk of its own, so the test can see which ranks wrote files. Writes OUT/rank-{r}.json and
OUT/{scenario}-weights-{r}.safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import loreft.backend

loreft.backend.setup()  # before mlx.core, as the CLI does

import mlx.core as mx  # noqa: E402
import mlx_lm
from mlx_lm.tokenizer_utils import load as load_tokenizer

from loreft import ReftConfig, TrainConfig, attach
from loreft.data import Formatter, pad_id_for, tokenize_rows
from loreft.demo import DEMO_COMPLETION_TEMPLATE, DEMO_PROMPT_TEMPLATE, DEMO_ROWS
from loreft.reporting import Callback
from loreft.trainer import NonFiniteLossError, latest_checkpoint, train

# 10 training rows of different completion lengths: with a global batch of 4 the two ranks hold
# different numbers of target tokens, which is what makes a mean of per-rank means wrong.
VALID_ROWS = [{"instruction": r["instruction"] + " Again?", "output": r["output"][::-1]} for r in DEMO_ROWS[:5]]


def config(**kw) -> TrainConfig:
    base = dict(learning_rate=2e-2, batch_size=4, epochs=2, grad_accumulation_steps=2, grad_clip=0.5,
                warmup_ratio=0.0, steps_per_report=1, steps_per_eval=2, save_every=2, seed=0, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Callback):
    """Counts callback calls (only rank 0 should get any); optionally stops or poisons the weights."""

    def __init__(self, reft=None, stop_after: int = 0, poison_after: int = 0):
        self.reft, self.stop_after, self.poison_after = reft, stop_after, poison_after
        self.events, self.step = 0, 0

    def on_train_start(self, info):
        self.events += 1

    def on_step(self, step, total):
        self.events += 1
        self.step = step
        if step == self.poison_after:  # this rank's weights only: its next loss is NaN
            iv = next(iter(self.reft.interventions().values()))
            iv.weight = mx.full(iv.weight.shape, float("nan"))

    def on_report(self, m):
        self.events += 1

    def should_stop(self):
        return bool(self.stop_after) and self.step >= self.stop_after


def main(model_dir: str, out: str, scenarios: str) -> None:
    world = mx.distributed.init()
    rank, out = world.rank(), Path(out)
    tok = load_tokenizer(Path(model_dir))
    fmt = Formatter(tok, prompt_template=DEMO_PROMPT_TEMPLATE, completion_template=DEMO_COMPLETION_TEMPLATE)
    train_set, _ = tokenize_rows(DEMO_ROWS, fmt, tok, 128)
    valid_set, _ = tokenize_rows(VALID_ROWS, fmt, tok, 128, split="valid")
    pad_id = pad_id_for(tok)

    def fresh(seed: int = 0):
        m, _ = mlx_lm.load(model_dir)
        return attach(m, ReftConfig(layers="1;3", rank=2, positions="f2+l2", seed=seed))

    def record(name: str, reft, summary: dict, cb: Recorder | None = None) -> dict:
        mx.save_safetensors(str(out / f"{name}-weights-{rank}.safetensors"), reft.parameters())
        return {"summary": summary, "events": cb.events if cb else 0}

    results = {"rank": rank, "world": world.size()}
    if "A" in scenarios:  # a whole run
        reft, cb = fresh(), Recorder()
        summary = train(reft, train_set, valid_set, config(), out / f"A-{rank}", callbacks=[cb], pad_id=pad_id)
        results["A"] = record("A", reft, summary, cb)
    if "B" in scenarios:  # stop after 4 steps (asked on rank 0 only), then resume; rank 1 has no checkpoint
        reft, cb = fresh(), Recorder(stop_after=4)
        first = train(reft, train_set, valid_set, config(), out / f"B-{rank}", callbacks=[cb], pad_id=pad_id)
        found = latest_checkpoint(out / f"B-{rank}")
        reft = fresh(seed=rank)  # other ranks start from other weights: resuming must replace them
        summary = train(reft, train_set, valid_set, config(), out / f"B-{rank}", pad_id=pad_id, resume_from=found)
        results["B"] = record("B", reft, summary)
        results["B"].update(first_steps=first["steps"], first_stopped=first["stopped"], found=str(found) if found else None)
    if "C" in scenarios:  # rank 0's weights go bad after step 1: every rank must stop at the first step using them
        reft = fresh()
        cb = Recorder(reft, poison_after=1)
        try:
            train(reft, train_set, None, config(save_every=0, grad_accumulation_steps=1), out / f"C-{rank}",
                  callbacks=[cb], pad_id=pad_id)
            results["C"] = {"error": None}
        except NonFiniteLossError as e:
            results["C"] = {"error": str(e)}
    if "D" in scenarios:  # stop asked after step 3 while step 4 is already queued: step 4 is undone everywhere
        reft, cb = fresh(), Recorder(stop_after=3)
        summary = train(reft, train_set, None, config(save_every=0, steps_per_eval=0, grad_accumulation_steps=1),
                        out / f"D-{rank}", callbacks=[cb], pad_id=pad_id)
        results["D"] = record("D", reft, summary, cb)
    (out / f"rank-{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
