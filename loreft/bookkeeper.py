"""What the training loop does between steps: reports, evaluations, the best adapter, checkpoints, callbacks."""

from __future__ import annotations

import contextlib
import json
import shutil
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim

from .adapter import save_adapter
from .blas import blas_threads
from .checkpoints import CHECKPOINTS, checkpoint_folder, save_checkpoint
from .config import TrainConfig
from .data import Example
from .evaluate import evaluate_loss
from .model import Reft
from .reporting import TENSORBOARD_DIR, Callback, write_metrics


def release_cached_memory() -> None:
    """Give the device the free buffers MLX keeps for reuse, at the boundaries of a run's phases.

    MLX keeps every freed buffer for the next allocation of its size: within training that is what makes steps
    fast, but across phases (evaluation, saving, the end) one phase's buffers would stay reserved on top of the
    next one's, and the process holds them until it exits (which is what nvidia-smi shows). Clearing at phase
    boundaries costs one re-allocation of the step's buffers per evaluation or save, not one per step.
    """
    mx.clear_cache()


# While training on an NVIDIA GPU, MLX keeps at most this many bytes of freed buffers for reuse (None: MLX's own
# limit). A step's buffers come back at the same sizes every step and are reused within it; without a cap MLX
# also keeps buffers of sizes no later allocation asks for, and nvidia-smi counts them: on an H200 with about
# every token of 8 x 512 supervised, 13.4-14.3 GB at the peak against 15.3-15.8 GB uncapped, with no speed cost
# seen through the spread between jobs (BENCHMARKS.md, "Whole jobs through the command lines").
TRAINING_CACHE_LIMIT: int | None = 256 * 2**20


@contextlib.contextmanager
def training_cache_limit():
    """Within the block, cap MLX's cache of freed buffers at TRAINING_CACHE_LIMIT on a CUDA GPU; restore it after."""
    if TRAINING_CACHE_LIMIT is None or not _on_cuda():
        yield
        return
    before = mx.set_cache_limit(TRAINING_CACHE_LIMIT)
    try:
        yield
    finally:
        mx.set_cache_limit(before)


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


class Bookkeeper:
    """Reads each step's results and does what is due after it; keeps the run's history and its best adapter."""

    def __init__(self, reft: Reft, optimizer: optim.Optimizer, cfg: TrainConfig, *, group, adapter_dir: Path,
                 total_steps: int, steps_per_epoch: int, callbacks: list[Callback], valid_set: Sequence[Example] | None,
                 test_set: Sequence[Example] | None, pad_id: int, saved: dict | None, last_checkpoint: Path | None,
                 adapter_kw: dict, test_metrics_fn: Callable | None = None, stale_checkpoints: Path | None = None):
        self.reft, self.optimizer, self.cfg, self.group = reft, optimizer, cfg, group
        self.is_main = group.rank() == 0  # only rank 0 writes files and calls callbacks
        self.adapter_dir, self.total_steps, self.steps_per_epoch = adapter_dir, total_steps, steps_per_epoch
        self.callbacks = callbacks if self.is_main else []
        self.valid_set, self.test_set, self.pad_id = valid_set, test_set, pad_id
        self.adapter_kw, self.test_metrics_fn = adapter_kw, test_metrics_fn
        saved = saved or {}
        self.history = saved.get("history", [])  # train reports and evaluations, resumed with the checkpoint
        self.trained_tokens_before = saved.get("trained_tokens", 0)  # all ranks' tokens before this run's first step
        self.last_checkpoint = last_checkpoint
        # another run's checkpoints in adapter_dir: never kept, resumed or reported; removed at this run's first
        self.stale_checkpoints = stale_checkpoints
        # the best evaluation so far ({"step", "metric", "value"}) and the weights after that step
        self.best, self.best_weights = saved.get("best"), saved.get("best_weights")
        self.evals_without_improvement = saved.get("evals_without_improvement", 0)
        self.early_stop_reason: str | None = None
        self.last_eval_step: int | None = None
        self.steps_done, self.seen_tokens, self.train_time = 0, 0, 0.0  # this run's steps, all ranks' tokens
        self.since_report = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
        self.tic = time.perf_counter()

    # what is due after a step (done: steps finished)

    @property
    def evaluates(self) -> bool:
        """Whether this run evaluates (a validation split, or exact match on test picks the best adapter)."""
        return bool(self.valid_set) or (self.cfg.best_metric == "test_exact_match" and bool(self.test_set))

    def eval_due(self, done: int) -> bool:
        return self.evaluates and bool(self.cfg.steps_per_eval and done % self.cfg.steps_per_eval == 0) and done < self.total_steps

    def checkpoint_due(self, done: int) -> bool:
        return bool(self.cfg.save_every and done % self.cfg.save_every == 0) and done < self.total_steps

    def needs_weights(self, done: int) -> bool:
        """Whether what runs after this step must see the weights as it left them (nothing queued behind it)."""
        return done == self.total_steps or self.eval_due(done) or self.checkpoint_due(done)

    # the loop's calls

    def start(self, info: dict) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info)
        self.tic = time.perf_counter()

    def record(self, step: int, results: tuple) -> None:
        """Read a step's loss and counts (the global batch's: the step all-reduces them); report when due."""
        loss, targets, tokens, lr = results
        loss_value, targets_value, tokens_value = loss.item(), int(targets.item()), int(tokens.item())
        now = time.perf_counter()
        elapsed, self.tic = now - self.tic, now
        done = step + 1
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self.non_finite_message(f"loss became {loss_value}", done))
        self.seen_tokens += tokens_value
        self.train_time += elapsed
        self.steps_done += 1
        since = self.since_report
        since["loss"] += loss_value * targets_value
        since["targets"] += targets_value
        since["tokens"] += tokens_value
        since["time"] += elapsed
        for cb in self.callbacks:
            cb.on_step(done, self.total_steps)
        if done % self.cfg.steps_per_report == 0 or done == self.total_steps:
            self._report(step, lr)

    def after_step(self, done: int, mid_update: bool) -> None:
        """The evaluation and checkpoint due after this step (mid_update: gradients are still being accumulated)."""
        if self.eval_due(done):
            self.validate(done)
        if self.checkpoint_due(done) and not mid_update:
            self.checkpoint(done)
        if self.needs_weights(done):
            self.tic = time.perf_counter()  # evaluation and checkpoint time is not training time

    def stop_requested(self) -> bool:
        """Whether a callback asks to stop (rank 0's; the step queue takes the vote across ranks)."""
        return any(cb.should_stop() for cb in self.callbacks)

    def validate(self, step: int) -> dict | None:
        """The evaluation after `step` steps: validation loss (and test exact match when it picks the best); returns the valid row."""
        valid = self.evaluate(step, "valid", self.valid_set) if self.valid_set else None
        test = self.evaluate(step, "test", self.test_set) if self.cfg.best_metric == "test_exact_match" else None
        self.last_eval_step = step
        self._track_best(step, valid, test)
        return valid

    def _track_best(self, step: int, valid: dict | None, test: dict | None) -> None:
        """Keep the best weights by best_metric; count evaluations without improvement for early stopping."""
        metric = self.cfg.best_metric
        if metric == "last":
            return
        row, key = (test, "exact_match") if metric == "test_exact_match" else (valid, metric.removeprefix("eval_"))
        value = float(row[key])
        higher_is_better = metric == "test_exact_match"
        gain = math.inf if self.best is None else (value - self.best["value"]) * (1 if higher_is_better else -1)
        if gain > 0:  # strictly better: the adapter to keep (NaN never is)
            self.best = {"step": step, "metric": metric, "value": value}
            self.best_weights = self.reft.parameters()  # references: later updates make new arrays
        if gain > self.cfg.early_stopping_min_delta:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            self.early_stop_reason = (f"early stopping: {metric} did not improve by more than "
                                      f"{self.cfg.early_stopping_min_delta} in {patience} evaluation(s); best "
                                      f"{self.best['value']:.6g} at step {self.best['step']}")

    def save_final(self, step: int, args_record: dict) -> Path:
        """The adapter folder: the best adapter (or the last), then the last state beside it as a checkpoint.

        training_args.json ("adapter_step", "best") and metrics.jsonl (the winning evaluation's "best": true) say
        which step the saved adapter is from. Only rank 0 writes,
        but every rank ends with the saved adapter's weights loaded.
        """
        best = self.best if self.best is not None and self.best_weights is not None else None
        last = self.reft.parameters()
        saved_step = best["step"] if best else step
        record = {**args_record, "adapter_step": saved_step, "best": best, "stop_reason": self.early_stop_reason}
        split = "test" if best and best["metric"] == "test_exact_match" else "valid"
        rows = [{**r, "best": True} if best and r.get("kind") == "eval" and r.get("split") == split and r["step"] == best["step"]
                else r for r in self.history]  # the evaluation that picked the saved adapter
        if best and saved_step != step:
            self.reft.load_parameters(self.best_weights)

        def extras(tmp: Path) -> None:
            (tmp / "training_args.json").write_text(json.dumps(record, indent=2))
            write_metrics(rows, tmp / "metrics.jsonl")

        path = self.adapter_dir
        release_cached_memory()
        if self.is_main:
            keep = (TENSORBOARD_DIR,) if self.stale_checkpoints else (CHECKPOINTS, TENSORBOARD_DIR)
            path = save_adapter(self.reft, path, write_extras=extras, keep=keep, **self.adapter_kw)
        self.stale_checkpoints = None  # not carried into the new adapter folder
        if saved_step != step and self.last_checkpoint != checkpoint_folder(self.adapter_dir, step):
            self.reft.load_parameters(last)  # the last state, to resume from or compare with
            self.checkpoint(step)
            self.reft.load_parameters(self.best_weights)
        return path

    def evaluate(self, step: int, split: str, examples: Sequence[Example]) -> dict:
        """Loss and perplexity on a split (exact match too on test, where test_metrics_fn is given)."""
        release_cached_memory()  # the training step's buffers are not needed while evaluating, nor eval's after
        with blas_threads(None):  # all of them: a CPU training loop shares them between its streams
            metrics = evaluate_loss(self.reft.model, examples, self.cfg.batch_size, reft=self.reft, pad_id=self.pad_id,
                                    max_batches=self.cfg.max_eval_batches if split == "valid" else 0, group=self.group)
            if split == "test" and self.test_metrics_fn is not None:
                metrics.update(self.test_metrics_fn(examples))
        release_cached_memory()
        row = {"kind": "eval", "split": split, "step": step, **metrics}
        self.history.append(row)
        for cb in self.callbacks:
            cb.on_eval(row)
        return row

    def checkpoint(self, done: int) -> Path:
        """Write the checkpoint after `done` steps (rank 0 only: the others may not even share its disk)."""
        self.check_finite(done)  # this step's update may have gone bad: never save it
        folder = checkpoint_folder(self.adapter_dir, done)
        if self.is_main:
            release_cached_memory()
            if self.stale_checkpoints:
                shutil.rmtree(self.stale_checkpoints)  # this run's first checkpoint: the folder is this run's from now on
            save_checkpoint(self.reft, self.optimizer, folder, done, self.trainer_state(), self.best_weights, **self.adapter_kw)
        self.last_checkpoint, self.stale_checkpoints = folder, None
        for cb in self.callbacks:
            cb.on_checkpoint(done, folder)
        return folder

    def trainer_state(self) -> dict:
        """What a resumed run needs besides weights and optimizer state."""
        return {"history": self.history, "trained_tokens": self.trained_tokens_before + self.seen_tokens,
                "best": self.best, "evals_without_improvement": self.evals_without_improvement}

    def check_finite(self, step: int) -> None:
        """Raise NonFiniteLossError if an update left a NaN or infinity in the intervention weights."""
        if not all(mx.isfinite(v).all().item() for v in self.reft.parameters().values()):
            raise NonFiniteLossError(self.non_finite_message("intervention weights became non-finite", step))

    def non_finite_message(self, what: str, step: int) -> str:
        last = self.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        return (f"{what} at step {step}; training stopped and {kept}. "
                f"Try a lower learning_rate (now {self.cfg.learning_rate}) or grad_clip > 0.")

    def _report(self, step: int, lr: mx.array) -> None:
        done, since = step + 1, self.since_report
        row = {
            "kind": "train", "step": done, "epoch": step // self.steps_per_epoch,
            "loss": since["loss"] / max(since["targets"], 1),
            "learning_rate": lr.item(),
            "tokens_per_sec": since["tokens"] / max(since["time"], 1e-9),  # every token of the rows, prompts too
            "supervised_tokens_per_sec": since["targets"] / max(since["time"], 1e-9),  # the tokens the loss is on
            "trained_tokens": self.trained_tokens_before + self.seen_tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_s": (self.total_steps - done) * self.train_time / self.steps_done,
            "progress": done / self.total_steps,
        }
        self.history.append(row)
        for cb in self.callbacks:
            cb.on_report(row)
        self.since_report = dict.fromkeys(since, 0)
