"""The training loop: batches in, a compiled step, the bookkeeping between steps, the adapter out.

train() reads top to bottom: set up (optimizer, resume, the compiled step), then one loop over the
steps, in which a StepQueue (step_queue.py) runs the steps and a Bookkeeper (bookkeeper.py) reports,
evaluates and writes checkpoints; then the final evaluation and the adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from itertools import accumulate, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import background_compile
from .backend import graph_order_unbounded
from .blas import cores_shared_by
from .bookkeeper import Bookkeeper, NonFiniteLossError, release_cached_memory, training_cache_limit
from .checkpoints import CHECKPOINTS, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import Batch, Example, check_enough, iterate_batches, num_batches
from .interventions import batched_rotations, unstack
from .loss import PAD_TO, completion_loss, split_at_head, stage_batches
from .model import Reft
from .positions import Locations
from .reporting import Callback, plot_loss
from .step_queue import StepQueue

__all__ = ["BiasCorrectedAdam", "LoopOptions", "NonFiniteLossError", "latest_checkpoint", "load_checkpoint", "make_optimizer",
           "resolve_dtype", "save_checkpoint", "steps_per_epoch", "train"]

# Below this many rows per GPU, queuing a step's kernels takes the host longer than the GPU takes to run them.
ROWS_PER_GPU_TO_SCALE = 16


@dataclass
class LoopOptions:
    """How train() runs its steps. The defaults are the fast path; benchmarks and tests vary them."""

    loss: Callable = completion_loss  # (model, tokens, mask, supervised, split) -> (loss sum, target count)
    sparse_logits: bool = True  # run the LM head at supervised positions only, where split_at_head allows
    batched_rotations: bool = True  # orthonormalize every R in one batched pass per step
    compiled: bool = True  # mx.compile the step
    queue_ahead: int = 1  # steps queued behind the one whose loss is being read; 0: lockstep
    stage_steps: int = 32  # steps whose inputs are uploaded together (stage_batches)
    stop_vote: bool = True  # several processes: vote on stopping after every step (off: the run cannot be stopped)
    plot: Callable | None = plot_loss  # (history, path) -> None: loss.png beside the adapter
    cpu_streams: int = 2  # on a CPU: each batch's rows split over this many streams, each run by a thread of its own
    # on CUDA, a kernel folder without this step's kernels: train uncompiled while a child process builds them
    # (background_compile); LOREFT_BACKGROUND_COMPILE=0 compiles in this process before the first step instead
    background_compile: bool = field(default_factory=lambda: os.environ.get("LOREFT_BACKGROUND_COMPILE", "1") != "0")


def resolve_dtype(name: str) -> mx.Dtype:
    """'auto' -> bfloat16 where the GPU computes it fast (Metal, CUDA), float32 on a CPU."""
    if name == "auto":
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    return getattr(mx, name)


# ---------------------------------------------------------------------------------------------------
# Several processes: sums and rank 0's state


def sum_across_ranks(tree, group):
    """Sum every array of a tree over all ranks in one all-reduce per dtype (many small messages are slow)."""
    flat = [v for _, v in tree_flatten(tree)]
    if group.size() == 1 or not flat:
        return tree
    summed = [None] * len(flat)
    for dtype in dict.fromkeys(v.dtype for v in flat):  # first-seen order: the same on every rank
        members = [i for i, v in enumerate(flat) if v.dtype == dtype]
        total = mx.distributed.all_sum(mx.concatenate([flat[i].reshape(-1) for i in members]), group=group)
        for i, part in zip(members, mx.split(total, list(accumulate(flat[i].size for i in members))[:-1])):
            summed[i] = part.reshape(flat[i].shape)
    leaves = iter(summed)
    return tree_map(lambda _: next(leaves), tree)  # tree_map visits leaves in tree_flatten's order


def rank0_values(tree, group):
    """Rank 0's values of a tree of arrays, on every rank (an all-sum of rank 0's values and zeros)."""
    if group.rank() != 0:
        tree = tree_map(mx.zeros_like, tree)
    tree = sum_across_ranks(tree, group)
    mx.eval(tree)
    return tree


def share_rank0_state(reft: Reft, optimizer: optim.Optimizer, saved: dict | None, group) -> dict | None:
    """Give every rank rank 0's weights, optimizer state and trainer state: only rank 0 needs a checkpoint on disk."""
    text = json.dumps(saved).encode() if saved is not None else b""
    size = int(sum_across_ranks(mx.array(len(text)), group).item())  # only rank 0's text is non-empty
    buf = np.frombuffer(text, np.uint8) if text else np.zeros(size, np.uint8)
    text = bytes(np.array(rank0_values(mx.array(buf), group)).tobytes()) if size else b""
    reft.load_parameters(rank0_values(reft.parameters(), group))
    optimizer.state = rank0_values(optimizer.state, group)
    return json.loads(text) if text else None


# ---------------------------------------------------------------------------------------------------
# Optimizer, batches, the compiled step


def make_optimizer(cfg: TrainConfig, total_updates: int) -> optim.Optimizer:
    """Adam (AdamW when weight decay > 0) with warmup then constant / linear / cosine decay."""
    warmup = min(int(math.ceil(cfg.warmup_ratio * total_updates)), max(total_updates - 1, 0))
    rest = max(total_updates - warmup, 1)
    lr = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        main = lr
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, rest)
    else:
        main = optim.cosine_decay(lr, rest)
    if warmup > 0:
        after = main if callable(main) else (lambda _step, v=lr: v)
        ramp = lambda step: lr * (step + 1) / warmup  # update k of the warmup uses lr * (k+1) / warmup
        schedule = optim.join_schedules([ramp, after], [warmup])
    else:
        schedule = main
    return BiasCorrectedAdam(learning_rate=schedule, weight_decay=cfg.weight_decay)


class BiasCorrectedAdam(optim.Adam):
    """torch's Adam, or AdamW with weight_decay > 0 (pyreft trains with those): MLX's Adam with bias correction.

    The same update as optim.Adam(bias_correction=True) / optim.AdamW, with both corrections computed once per
    step in one fused kernel instead of three (on CUDA every distinct kernel is compiled on a cold start).
    """

    def __init__(self, learning_rate, weight_decay: float = 0.0):
        super().__init__(learning_rate=learning_rate, bias_correction=True)
        self.weight_decay = weight_decay
        self._corrections: tuple[mx.array, mx.array] | None = None

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._corrections = None  # made by the first apply_single, after the base class advanced step and rate
        return super().apply_gradients(gradients, parameters)

    def _bias_corrections(self) -> tuple[mx.array, mx.array]:
        # lr / (1 - b1^t) and 1 / sqrt(1 - b2^t) as one (2,) elementwise expression (one kernel); then slices,
        # not x[i] (a gather kernel)
        t = self.step.astype(mx.float32)
        scale = mx.where(mx.array([True, False]), self.learning_rate, 1.0)
        both = scale * (1 - mx.array(self.betas, mx.float32) ** t) ** mx.array([-1.0, -0.5])
        return both[:1], both[1:]

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        b1, b2 = self.betas
        if self.weight_decay > 0:  # decoupled, as optim.AdamW: before the Adam step, at the scheduled rate
            parameter = parameter * (1 - self.learning_rate.astype(gradient.dtype) * self.weight_decay)
        m = state["m"] = b1 * state["m"] + (1 - b1) * gradient
        v = state["v"] = b2 * state["v"] + (1 - b2) * mx.square(gradient)
        if self._corrections is None:
            self._corrections = self._bias_corrections()
        step_size, root_scale = (c.astype(gradient.dtype) for c in self._corrections)
        return parameter - step_size * m / (mx.sqrt(v) * root_scale + self.eps)


def steps_per_epoch(examples: Sequence[Example], batch_size: int, world_size: int = 1) -> int:
    """Batches in one pass over the examples (the last one may be smaller); batch_size is the global batch."""
    return num_batches(len(examples), batch_size, world_size=world_size)


def batch_stream(examples, cfg: TrainConfig, start: int, total: int, pad_id: int, group) -> Iterator[tuple[int, Batch]]:
    """(step, batch) from step `start` to `total`: the same sequence whether resumed or not."""
    per_epoch = steps_per_epoch(examples, cfg.batch_size, group.size())
    step = start
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        batches = iterate_batches(
            examples, cfg.batch_size, seed=cfg.seed, epoch=epoch, pad_id=pad_id, pad_to=PAD_TO,
            rank=group.rank(), world_size=group.size(),
        )
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            yield step, batch
            step += 1
            if step >= total:
                return


def row_shards(options: LoopOptions, world_size: int = 1) -> int:
    """Parts a step splits its batch's rows into, each worked out on a stream of its own: several on a CPU only.

    MLX runs a CPU stream's operations one at a time, most of them on one thread (only matmuls use more), so
    one stream leaves all but one core idle for much of a step; a GPU runs one stream's kernels across the chip.
    Several processes on CPUs already keep several cores busy: one part each. Without backend.setup()'s graph
    order the streams would run one after the other, at half the BLAS threads: one part then too.
    """
    if mx.default_device() != mx.cpu or world_size > 1 or not graph_order_unbounded():
        return 1
    return max(1, options.cpu_streams)


def staged(stream: Iterator[tuple[int, Batch]], reft: Reft, stage_steps: int, shards: int = 1) -> Iterator[tuple[int, tuple]]:
    """(step, step inputs) for a (step, batch) stream, the inputs uploaded stage_steps steps at a time.

    A step's inputs: one (tokens, mask, locations, supervised, token count) tuple per shard of its batch's rows.
    """
    while chunk := list(islice(stream, stage_steps)):
        parts = [batch.split(shards) for _, batch in chunk]
        arrays = iter(stage_batches(reft, [part for batch_parts in parts for part in batch_parts]))
        for (step, _), batch_parts in zip(chunk, parts):
            yield step, tuple(islice(arrays, len(batch_parts)))


def make_step(reft: Reft, optimizer: optim.Optimizer, cfg: TrainConfig, group=None, options: LoopOptions | None = None):
    """(step function, the state it updates): one batch's loss and gradient, and the update when it is due.

    step(shards, accumulated, update) -> (loss, targets, tokens, lr, accumulated), where shards holds one
    (tokens, mask, locations, supervised, n_tokens) tuple per part of the batch's rows (staged()), at most one
    per stream (row_shards(options)); each part's loss and gradient are worked out on a stream of its own.
    """
    options = options or LoopOptions()
    group = group or mx.distributed.init()
    model = reft.model
    split = split_at_head(model) if options.sparse_logits else None
    interventions = list(reft.interventions().values())
    reft.recompute_blocks(cfg.grad_checkpoint)
    rotations = batched_rotations if options.batched_rotations else (lambda _: contextlib.nullcontext())

    def loss(model, tokens, mask, locs, supervised=None):
        reft.set_locations(Locations.from_arrays(reft.groups, locs))
        try:
            with rotations(interventions):  # every R in one batched pass, not one per intervention
                return options.loss(model, tokens, mask, supervised, split)  # differentiated: the loss *sum*
        finally:
            reft.set_locations(None)

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]
    # each CPU stream has a thread of its own (MLX runs their work at once only if it interleaves: backend.setup)
    streams = [mx.default_stream(mx.default_device())]
    streams += [mx.new_stream(mx.cpu) for _ in range(row_shards(options, group.size()) - 1)]

    def shard_loss_and_grad(stream, tokens, mask, locs, supervised, n_tokens):
        with mx.stream(stream) if len(streams) > 1 else contextlib.nullcontext():
            (total, targets), grad = loss_and_grad(model, tokens, mask, locs, supervised)
            return mx.stack([total, targets, n_tokens.astype(mx.float32)]), grad

    def step(shards, accumulated, update):
        # Gradients of loss sums, divided by the target count of the whole update only after adding them up
        # (over row shards, ranks and accumulated batches): the token mean of the global batch, whatever each
        # share holds, with one all-reduce per step that carries the counts too (no collective mid-step).
        if len(shards) > len(streams):
            raise ValueError(f"{len(shards)} row shards for {len(streams)} streams")
        parts = [shard_loss_and_grad(stream, *shard) for stream, shard in zip(streams, shards)]
        counts, grad = parts[0]  # this rank's loss sum, targets, tokens, and their gradient
        for more_counts, more_grad in parts[1:]:
            counts, grad = counts + more_counts, tree_map(mx.add, grad, more_grad)
        grad_sum, targets_before = accumulated if accumulated is not None else (None, 0.0)
        if grad_sum is not None:
            grad = tree_map(mx.add, grad, grad_sum)
        if update:
            counts, grad = sum_across_ranks((counts, grad), group)  # identity on one process
            loss_sum, target_count, token_count = unstack(counts)  # slices: x[i] is a gather kernel
            update_targets = targets_before + target_count
            grad = tree_map(lambda g: g / update_targets, grad)
            if cfg.grad_clip > 0:
                grad, _ = optim.clip_grad_norm(grad, cfg.grad_clip)
            optimizer.update(model, grad)
            accumulated = None
        else:
            loss_sum, target_count, token_count = unstack(sum_across_ranks(counts, group))
            accumulated = (grad, targets_before + target_count)
        # the global batch's loss, target and token counts on every rank, and the learning rate it used
        return loss_sum / target_count, target_count, token_count, optimizer.learning_rate, accumulated

    return (compile_step(step, state) if options.compiled else step), state


def compile_step(step: Callable, state: list) -> Callable:
    """The step as one compiled graph that reads and updates `state` (make_step's)."""
    return mx.compile(step, inputs=state, outputs=state)


# ---------------------------------------------------------------------------------------------------
# The loop


def train(
    reft: Reft,
    train_set: Sequence[Example],
    valid_set: Sequence[Example] | None,
    cfg: TrainConfig,
    adapter_dir: str | Path,
    *,
    callbacks: Iterable[Callback] = (),
    test_set: Sequence[Example] | None = None,
    pad_id: int = 0,
    resume_from: str | Path | None = None,
    base_model: str | None = None,
    adapter_extra: dict | None = None,
    test_metrics_fn: Callable[[Sequence[Example]], dict] | None = None,
    group: mx.distributed.Group | None = None,
    options: LoopOptions | None = None,
) -> dict:
    """Train the interventions, save the adapter to adapter_dir, and return a summary.

    test_metrics_fn adds metrics to test evaluations (exact match after generation): the final one, and each
    evaluation when cfg.best_metric is "test_exact_match".
    group: the processes training together (mx.distributed.init() when None); options: see LoopOptions.
    """
    cfg.validate()
    options = options or LoopOptions()
    group = group or mx.distributed.init()
    model, adapter_dir, is_main = reft.model, Path(adapter_dir), group.rank() == 0
    check_enough(train_set, cfg.batch_size, "train")
    if valid_set:
        check_enough(valid_set, 1, "valid")
    check_selection(cfg, valid_set, test_set, test_metrics_fn is not None)
    per_epoch = steps_per_epoch(train_set, cfg.batch_size, group.size())  # checks batch_size % world size
    total_steps = cfg.iters or cfg.epochs * per_epoch

    optimizer_updates = math.ceil(total_steps / cfg.grad_accumulation_steps)
    optimizer = make_optimizer(cfg, optimizer_updates)
    optimizer.init(model.trainable_parameters())
    saved = load_checkpoint(reft, optimizer, resume_from) if resume_from is not None and is_main else None
    if group.size() > 1:
        best_weights = saved.pop("best_weights", None) if saved else None
        saved = share_rank0_state(reft, optimizer, saved, group)  # rank 0 decides whether and where to resume
        if saved and saved.get("best"):  # the template's values are ignored: rank 0's are taken
            saved["best_weights"] = rank0_values(best_weights or reft.parameters(), group)
    start = saved["step"] if saved else 0
    if saved:
        _check_resumable(start, total_steps, resume_from)
    plain_step, state = make_step(reft, optimizer, cfg, group, replace(options, compiled=False))
    step_fn = compile_step(plain_step, state) if options.compiled else plain_step

    stats = reft.stats()
    args_record = {"train": cfg.to_dict(), "reft": reft.config.to_dict(), "base_model": base_model, "total_steps": total_steps}
    book = Bookkeeper(reft, optimizer, cfg, group=group, adapter_dir=adapter_dir, total_steps=total_steps,
                      steps_per_epoch=per_epoch, callbacks=list(callbacks), valid_set=valid_set, test_set=test_set,
                      pad_id=pad_id, saved=saved, last_checkpoint=Path(resume_from) if resume_from is not None else None,
                      stale_checkpoints=_stale_checkpoints(adapter_dir, resume_from),
                      adapter_kw={"base_model": base_model, "extra": adapter_extra}, test_metrics_fn=test_metrics_fn)
    # a kernel folder that has not seen this step: train uncompiled while a child process builds its kernels
    kernels = background_compile.kernel_folder() if options.compiled else None  # None: not on a CUDA GPU
    spec = None if kernels is None else _background_spec(
        reft, cfg, options, group, base_model, optimizer_updates, train_set, pad_id)
    background = background_compile.start(kernels, spec) if options.background_compile else None
    # a step compiled in this process puts all its kernels in the folder too: recorded after its first update
    # (unless recorded before), so that later jobs with the same step need no child
    recorded = spec is None or background is not None or background_compile.marker(kernels, spec).is_file()
    unrecorded = None if recorded else spec
    compiled_from = None  # with a background compile: the first step queued compiled
    queue = StepQueue(plain_step if background else step_fn, state, reft, optimizer, group=group, seed=cfg.seed,
                      accumulation=cfg.grad_accumulation_steps, total_steps=total_steps,
                      queue_ahead=options.queue_ahead, barrier=book.needs_weights, stop_vote=options.stop_vote)
    notes = _run_notes(cfg, group.size()) + ([background_compile.NOTE] if background else [])
    try:
        book.start({"total_steps": total_steps, "start_step": start, "trainable": stats.trainable,
                    "total_parameters": stats.total, "percent": stats.percent, "notes": notes, **args_record})
        model.train()
        shards = row_shards(options, group.size())
        steps = staged(batch_stream(train_set, cfg, start, total_steps, pad_id, group), reft, options.stage_steps, shards)
        # CPU streams share the cores in their matmuls; on a GPU, MLX's cache of freed buffers is capped
        with cores_shared_by(shards), training_cache_limit():
            for step, results in queue.run(steps):
                if background is not None and compiled_from is None and background.done():  # kernels on disk
                    queue.step_fn = step_fn
                    compiled_from = queue.queued[-1].step + 1 if queue.queued else step + 1
                book.record(step, results)
                if unrecorded is not None and queue.accumulated is None:  # an update ran: every kernel built
                    _record_kernels(kernels, unrecorded)
                    unrecorded = None
                book.after_step(step + 1, mid_update=queue.accumulated is not None)
                queue.stop_if(book.stop_requested() or book.early_stop_reason is not None)
    finally:
        if background is not None:
            background.close()

    final_step = start + book.steps_done
    stopped = queue.stopped and book.early_stop_reason is None  # early stopping ends the run normally
    book.check_finite(final_step)
    # a stop saves at once (the app may kill the process seconds later); a finished run evaluates first
    valid_metrics = None
    if book.evaluates and not stopped:
        valid_metrics = book.validate(final_step) if book.last_eval_step != final_step else _last_valid(book.history)
    path = book.save_final(final_step, args_record)
    adapter_step = book.best["step"] if book.best and book.best_weights is not None else final_step
    if adapter_step != final_step and not stopped:  # the summary describes the adapter saved
        valid_metrics = _last_valid([r for r in book.history if r["step"] == adapter_step]) or valid_metrics
    test_metrics = None
    if test_set and not stopped:
        reuse = [r for r in book.history if r["kind"] == "eval" and r["split"] == "test" and r["step"] == adapter_step]
        test_metrics = reuse[-1] if reuse else book.evaluate(adapter_step, "test", test_set)
    summary = {
        "adapter": str(path), "steps": final_step, "total_steps": total_steps, "stopped": stopped,
        "stop_reason": book.early_stop_reason, "adapter_step": adapter_step, "best": book.best,
        "train_loss": next((r["loss"] for r in reversed(book.history) if r["kind"] == "train"), None),
        "valid": valid_metrics, "test": test_metrics, "trainable": stats.trainable,
        "total_parameters": stats.total, "train_time_s": book.train_time,
        "background_compile": background and {  # None: the step compiled in this process (or never)
            "uncompiled_steps": (final_step if compiled_from is None else compiled_from) - start,
            "kernels_moved": background.moved, "error": background.error},
    }
    release_cached_memory()  # the run is over: what nvidia-smi shows drops to the weights and the adapter
    for cb in book.callbacks:
        cb.on_end(summary)
    # optional files last: after a stop, on_end publishes the adapter (TransformerLab's task) before the
    # app's SIGKILL, 3 s after its SIGTERM; drawing the plot first took seconds
    if is_main and options.plot is not None:
        _write_beside(path / "loss.png", lambda tmp: options.plot(book.history, tmp))
    return summary


def _record_kernels(folder: Path, spec: dict) -> None:
    """background_compile.record for the step this process compiled; a disk that refuses costs only a head start."""
    try:
        background_compile.record(folder, spec)
    except OSError:
        pass


def _background_spec(reft: Reft, cfg: TrainConfig, options: LoopOptions, group, base_model: str | None,
                     optimizer_updates: int, rows: Sequence[Example], pad_id: int) -> dict | None:
    """The step for background_compile's child to build, or None where it cannot build the same one."""
    if group.size() > 1 or base_model is None or options.loss is not completion_loss:
        return None  # several processes all-reduce inside the step; a custom loss or model the child cannot load
    from .models import quantized_layers, resolve_model

    return background_compile.step_spec(
        resolve_model(base_model), resolve_dtype(cfg.dtype), dequantized=not quantized_layers(reft.model),
        reft_config=reft.config.to_dict(), layers=reft.layers, num_layers=reft.num_layers, train_config=cfg.to_dict(),
        total_updates=optimizer_updates,
        loop={"sparse_logits": options.sparse_logits, "batched_rotations": options.batched_rotations},
        rows=list(rows[:background_compile.ROWS]), pad_id=pad_id)


def check_selection(cfg: TrainConfig, valid_set, test_set, has_test_metrics: bool) -> None:
    """The evaluations best_metric and early stopping need are there; ConfigError otherwise."""
    metric = cfg.best_metric
    if metric == "test_exact_match" and not (test_set and has_test_metrics):
        raise ConfigError("best_metric", metric, "needs a test split and exact match (one process); "
                          "choose eval_loss, eval_perplexity or last")
    if cfg.early_stopping_patience and metric in ("eval_loss", "eval_perplexity") and not valid_set:
        raise ConfigError("early_stopping_patience", cfg.early_stopping_patience,
                          "needs a validation split (give one, or set valid_fraction > 0)")


def _last_valid(history: list[dict]) -> dict | None:
    rows = [r for r in history if r.get("kind") == "eval" and r.get("split") == "valid"]
    return rows[-1] if rows else None


def _write_beside(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename onto path: an optional file added after the adapter is complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_resumable(step: int, total_steps: int, folder) -> None:
    """A checkpoint at or past this run's last step belongs to another (longer) run: refuse it."""
    if step >= total_steps:
        raise ConfigError("resume", str(folder), f"the checkpoint is at step {step}, but this run has {total_steps} "
                                                 "steps; it comes from another run: resume with that run's settings, "
                                                 "or start fresh without resume")


def _stale_checkpoints(adapter_dir: Path, resume_from) -> Path | None:
    """adapter_dir/checkpoints when it holds another run's checkpoints (this run did not resume from one of them)."""
    folder = adapter_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    if resume_from is not None and folder.resolve() in Path(resume_from).resolve().parents:
        return None
    return folder


def _run_notes(cfg: TrainConfig, world_size: int) -> list[str]:
    """Advice about this run's setting, shown when it starts."""
    rows = cfg.batch_size // world_size
    if world_size > 1 and mx.cuda.is_available() and rows < ROWS_PER_GPU_TO_SCALE:
        return [f"each of the {world_size} GPUs trains {rows} rows per step: with fewer than {ROWS_PER_GPU_TO_SCALE}, "
                f"queuing a step's kernels takes the host longer than the GPU takes to run them, and {world_size} GPUs "
                f"can be slower than one. A batch_size of {2 * ROWS_PER_GPU_TO_SCALE * world_size} keeps every GPU busy; "
                f"for this global batch, fewer GPUs train faster."]
    return []
