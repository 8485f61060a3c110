"""The training loop: a compiled step, schedules, evaluation, checkpoints with exact resume, callbacks."""

from __future__ import annotations

import json
import math
import time
from itertools import accumulate, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .adapter import WEIGHTS_FILE, save_adapter
from .config import TrainConfig
from .data import Batch, Example, check_enough, iterate_batches, num_batches
from .interventions import batched_rotations
from .model import Reft
from .positions import Locations
from .reporting import Callback, plot_loss, write_metrics

PAD_TO = 32  # round batch lengths up so the compiled step sees few distinct shapes
CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
QUEUE_AHEAD = 1  # steps queued behind the one whose loss is being read; 0: lockstep
STAGE_STEPS = 32  # steps whose inputs are uploaded together (stage_batches)
ROWS_PER_GPU_TO_SCALE = 16  # below this, NCCL ranks were host-bound: 2 H200s slower than one (BENCHMARKS.md)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


def resolve_dtype(name: str) -> mx.Dtype:
    """'auto' -> bfloat16 where the GPU computes it fast (Metal, CUDA), float32 on a CPU."""
    if name == "auto":
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    return getattr(mx, name)


@mx.custom_function
def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Next-token cross-entropy per position, in float32 from logits of any dtype (nn.losses.cross_entropy's value)."""
    x = logits.astype(mx.float32)
    return mx.logsumexp(x, axis=-1) - mx.take_along_axis(x, targets[..., None], axis=-1).squeeze(-1)


@token_cross_entropy.vjp
def _token_cross_entropy_vjp(primals, cotangent, output):
    # softmax - one_hot in one fused elementwise pass over the logits, straight to their dtype: the generic
    # vjp keeps float32 logits alive and adds a scattered one-hot, several passes over a (tokens, vocab) array
    logits, targets = primals
    x = logits.astype(mx.float32)
    lse = output + mx.take_along_axis(x, targets[..., None], axis=-1).squeeze(-1)
    g = cotangent[..., None]
    grad = mx.exp(x - lse[..., None]) * g - (mx.arange(x.shape[-1]) == targets[..., None]) * g
    return grad.astype(logits.dtype), mx.zeros_like(targets)


def completion_loss(
    model: nn.Module, tokens: mx.array, mask: mx.array, picks: mx.array | None = None, head=None
) -> tuple[mx.array, mx.array]:
    """(sum of next-token cross-entropy over the masked targets, number of targets).

    With picks (supervised_positions of the mask) and head (output_head of the model), the LM head runs
    only at the picked positions: the same loss, without the vocabulary-sized logits of unsupervised ones.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if picks is None or head is None:
        ce = token_cross_entropy(model(inputs), targets) * mask
        return ce.sum(), mask.sum()
    body, lm_head = head
    hidden = body(inputs)
    hidden = mx.take(hidden.reshape(-1, hidden.shape[-1]), picks, axis=0)  # (n_picks, d)
    ce = token_cross_entropy(lm_head(hidden), targets.reshape(-1)[picks])
    return (ce * mask.reshape(-1)[picks]).sum(), mask.sum()


def output_head(model: nn.Module):
    """(body, head) with model(x) == head(body(x)), checked on a few tokens; None where unsure.

    Covers mlx-lm's usual layout: model.model gives the final hidden states, then lm_head or the tied
    embedding (embed_tokens.as_linear), with gemma-style final logit softcapping. Anything else (an
    extra scale, a wrapper) fails the check, and the loss then computes full logits as before.
    """
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        return None
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        head = model.lm_head
    elif hasattr(getattr(body, "embed_tokens", None), "as_linear"):
        head = body.embed_tokens.as_linear
    else:
        return None
    cap = getattr(model, "final_logit_softcapping", None) or getattr(getattr(model, "args", None), "final_logit_softcapping", None)
    if cap:
        head = _softcapped(head, cap)
    try:
        probe = mx.array([[1, 2, 3, 0, 1]])
        want, got = model(probe), head(body(probe))
        same = want.shape == got.shape and mx.allclose(want.astype(mx.float32), got.astype(mx.float32), rtol=1e-5, atol=1e-5).item()
    except Exception:  # an unusual signature or output: stay on the full-logits path
        return None
    return (body, head) if same else None


def _softcapped(head, cap: float):
    """gemma2-style final logit softcapping around an output head."""
    return lambda h: mx.tanh(head(h) / cap) * cap


def supervised_positions(mask: np.ndarray) -> np.ndarray | None:
    """Flat indices of a (B, T) loss mask's supervised targets, for computing logits there only.

    Padded with an unsupervised index (weight 0) to one of a few sizes (1/64 .. 6/8 of B*T), so the compiled
    step sees few shapes; None when more than 3/4 are supervised (the full logits then cost about the same).
    """
    flat = mask.reshape(-1)
    hits = np.flatnonzero(flat)
    sizes = [flat.size // 64, flat.size // 32, flat.size // 16] + [flat.size * k // 8 for k in range(1, 7)]
    size = next((s for s in sizes if s >= max(len(hits), 1)), None)
    if size is None or len(hits) == flat.size:
        return None
    pad = np.full(size - len(hits), np.flatnonzero(flat == 0)[0])
    return np.concatenate([hits, pad]).astype(np.int32)


def batch_arrays(reft: Reft, batch: Batch) -> tuple[mx.array, mx.array, list[mx.array], mx.array | None, mx.array]:
    """The training step's inputs for one batch: tokens, loss mask, intervention locations, supervised positions, token count."""
    return stage_batches(reft, [batch])[0]


def stage_batches(reft: Reft, batches: Sequence[Batch]) -> list[tuple]:
    """batch_arrays for several batches, all views of one uploaded array.

    On CUDA, an array made from host data may take a cached device buffer of its size, which MLX then
    moves to unified memory with a copy that waits for the GPU: one upload for many steps' inputs, rather
    than six per step, keeps the host from stalling while it queues work (bench/step_timing.py).
    """
    pieces, layout, offset = [], [], 0
    for batch in batches:
        mask = batch.loss_mask()
        picks = supervised_positions(mask)
        total = np.array(batch.lengths.sum(), np.int32)
        arrays = [batch.tokens, mask, *reft.locations(batch.prompt_lengths, host=True).as_arrays(), picks, total]
        layout.append([])
        for a in arrays:
            if a is None:
                layout[-1].append(None)
                continue
            a = np.asarray(a, np.float32 if a.dtype.kind == "f" else np.int32)
            layout[-1].append((offset, a.shape, a.dtype))
            pieces.append(np.ascontiguousarray(a.reshape(-1)).view(np.int32))  # floats travel as their bits
            offset += a.size
    flat = mx.array(np.concatenate(pieces) if pieces else np.zeros(0, np.int32))

    def view(entry):
        if entry is None:
            return None
        start, shape, dtype = entry
        part = flat[start:start + math.prod(shape)]
        return (part.view(mx.float32) if dtype == np.float32 else part).reshape(shape)

    staged = []
    for entries in layout:
        tokens, mask, *locs, picks, total = [view(e) for e in entries]
        staged.append((tokens, mask, locs, picks, total))
    return staged


def evaluate_loss(
    model: nn.Module, examples: Sequence[Example], batch_size: int, *, reft: Reft | None = None, pad_id: int = 0,
    max_batches: int = 0,
) -> dict:
    """Completion-token loss and perplexity in eval mode; the interventions edit when reft is given."""
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    world = mx.distributed.init()
    try:
        # each rank scores its share of every batch; nothing is dropped (ranks need not stay in step here)
        batches = iterate_batches(examples, batch_size, shuffle=False, pad_id=pad_id, pad_to=PAD_TO,
                                  rank=world.rank(), world_size=world.size(), equal_shares=False)
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            tokens, mask = mx.array(batch.tokens), mx.array(batch.loss_mask())
            if reft is not None:
                reft.set_locations(reft.locations(batch.prompt_lengths))
            s, n = completion_loss(model, tokens, mask)
            total, count = total + s, count + n
            mx.async_eval(total, count)  # queue this batch while the next one is prepared
    finally:
        if reft is not None:
            reft.set_locations(None)
        model.train(was_training)
    total, count = _sum_across_ranks(total), _sum_across_ranks(count)
    loss = (total / mx.maximum(count, 1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count.item())}


def _sum_across_ranks(x: mx.array) -> mx.array:
    """Sum over all ranks (x itself on one process); on the backend's own stream: nccl cannot use mx.cpu."""
    world = mx.distributed.init()
    return mx.distributed.all_sum(x) if world.size() > 1 else x


def _sum_tree_across_ranks(tree):
    """Sum every array of a tree over all ranks in one all-reduce per dtype (many small messages are slow)."""
    flat = [v for _, v in tree_flatten(tree)]
    if mx.distributed.init().size() == 1 or not flat:
        return tree
    summed = [None] * len(flat)
    for dtype in dict.fromkeys(v.dtype for v in flat):  # first-seen order: the same on every rank
        group = [i for i, v in enumerate(flat) if v.dtype == dtype]
        total = mx.distributed.all_sum(mx.concatenate([flat[i].reshape(-1) for i in group]))
        for i, part in zip(group, mx.split(total, list(accumulate(flat[i].size for i in group))[:-1])):
            summed[i] = part.reshape(flat[i].shape)
    leaves = iter(summed)
    return tree_map(lambda _: next(leaves), tree)  # tree_map visits leaves in tree_flatten's order


def _from_main(tree):
    """Rank 0's values of a tree of arrays, on every rank (an all-sum of rank 0's values and zeros)."""
    if mx.distributed.init().rank() != 0:
        tree = tree_map(mx.zeros_like, tree)
    tree = _sum_tree_across_ranks(tree)
    mx.eval(tree)
    return tree


def _share_main_state(reft: Reft, optimizer: optim.Optimizer, saved: dict | None) -> dict | None:
    """Give every rank rank 0's weights, optimizer state and trainer state: only rank 0 needs a checkpoint on disk."""
    text = json.dumps(saved).encode() if saved is not None else b""
    size = int(_sum_across_ranks(mx.array(len(text))).item())  # only rank 0's text is non-empty
    buf = np.frombuffer(text, np.uint8) if text else np.zeros(size, np.uint8)
    text = bytes(np.array(_from_main(mx.array(buf))).tobytes()) if size else b""
    reft.load_parameters(_from_main(reft.parameters()))
    optimizer.state = _from_main(optimizer.state)
    return json.loads(text) if text else None


def release_cached_memory() -> None:
    """Give the device the free buffers MLX keeps for reuse, between phases of a run (evaluation, saving, the end).

    MLX keeps every freed buffer for the next allocation of its size: within a training step that is what makes
    steps fast, but across phases the buffers of one phase (other shapes) stay reserved on top of the next
    one's, and the process holds them until it exits (which is what nvidia-smi shows). Clearing at phase
    boundaries costs one re-allocation of the step's buffers, not one per step.
    """
    mx.clear_cache()


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
    # bias correction as in torch's Adam/AdamW (pyreft trains with those): MLX leaves it off by default
    if cfg.weight_decay > 0:
        return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay, bias_correction=True)
    return optim.Adam(learning_rate=schedule, bias_correction=True)


def steps_per_epoch(examples: Sequence[Example], batch_size: int, world_size: int = 1) -> int:
    """Batches in one pass over the examples (the last one may be smaller); batch_size is the global batch."""
    return num_batches(len(examples), batch_size, world_size=world_size)


def _batch_stream(examples, cfg: TrainConfig, start: int, total: int, pad_id: int) -> Iterator[tuple[int, Batch]]:
    """(step, batch) from step `start` to `total`: the same sequence whether resumed or not."""
    world = mx.distributed.init()
    per_epoch = steps_per_epoch(examples, cfg.batch_size, world.size())
    step = start
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        batches = iterate_batches(
            examples, cfg.batch_size, seed=cfg.seed, epoch=epoch, pad_id=pad_id, pad_to=PAD_TO,
            rank=world.rank(), world_size=world.size(),
        )
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            yield step, batch
            step += 1
            if step >= total:
                return


def _staged(stream: Iterator[tuple[int, Batch]], reft: Reft) -> Iterator[tuple[int, tuple]]:
    """(step, step inputs) for a (step, batch) stream, the inputs uploaded STAGE_STEPS steps at a time."""
    while chunk := list(islice(stream, STAGE_STEPS)):
        yield from zip([step for step, _ in chunk], stage_batches(reft, [batch for _, batch in chunk]))


def _make_step(reft: Reft, optimizer: optim.Optimizer, cfg: TrainConfig, compiled: bool = True):
    model = reft.model
    head = output_head(model)  # logits at supervised positions only, where the model's layout allows
    interventions = list(reft.interventions().values())
    reft.recompute_blocks(cfg.grad_checkpoint)

    def loss(model, tokens, mask, locs, picks=None):
        reft.set_locations(Locations.from_arrays(reft.groups, locs))
        try:
            with batched_rotations(interventions):  # every R in one batched pass, not one per intervention
                return completion_loss(model, tokens, mask, picks, head)  # differentiated: the loss *sum*
        finally:
            reft.set_locations(None)

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(tokens, mask, locs, picks, n_tokens, carry, do_update):
        # Gradients of loss sums, divided by the target count of the whole update only after adding them up
        # (over ranks and accumulated batches): the token mean of the global batch, whatever each share
        # holds, with one all-reduce per step that carries the counts too (no collective mid-step).
        (total, targets), grad = loss_and_grad(model, tokens, mask, locs, picks)
        counts = mx.stack([total, targets, n_tokens.astype(mx.float32)])  # this rank's loss sum, targets, tokens
        grad_sum, targets_before = carry if carry is not None else (None, 0.0)
        if grad_sum is not None:
            grad = tree_map(lambda a, b: a + b, grad, grad_sum)
        if do_update:
            counts, grad = _sum_tree_across_ranks((counts, grad))  # identity on one process
            grad = tree_map(lambda g: g / (targets_before + counts[1]), grad)
            if cfg.grad_clip > 0:
                grad, _ = optim.clip_grad_norm(grad, cfg.grad_clip)
            optimizer.update(model, grad)
            carry = None
        else:
            counts = _sum_tree_across_ranks(counts)
            carry = (grad, targets_before + counts[1])
        # the global batch's loss, target and token counts on every rank, and the learning rate it used
        return counts[0] / counts[1], counts[1], counts[2], optimizer.learning_rate, carry

    return (mx.compile(step, inputs=state, outputs=state) if compiled else step), state


def save_checkpoint(reft: Reft, optimizer: optim.Optimizer, folder: Path, step: int, trainer_state: dict, **adapter_kw) -> Path:
    """A complete adapter plus optimizer state and progress, written atomically."""
    opt_state = dict(tree_flatten(optimizer.state))
    mx.eval(opt_state)

    def extras(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt_state)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}))

    return save_adapter(reft, folder, write_extras=extras, **adapter_kw)


def latest_checkpoint(adapter_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under adapter_dir/checkpoints, or None."""
    folder = Path(adapter_dir) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(reft: Reft, optimizer: optim.Optimizer, folder: str | Path) -> dict:
    """Restore intervention weights and optimizer state from a checkpoint; returns its trainer state."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint ({STATE_FILE} is missing)")
    reft.load_parameters(mx.load(str(folder / WEIGHTS_FILE)))
    saved = mx.load(str(folder / OPTIMIZER_FILE))
    optimizer.init(reft.model.trainable_parameters())
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {folder} does not match this run's optimizer (missing {missing[:3]})")
    optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
    return json.loads((folder / STATE_FILE).read_text())


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
) -> dict:
    """Train the interventions, save the adapter to adapter_dir, and return a summary.

    test_metrics_fn adds metrics to the final test evaluation (e.g. exact match after generation).
    """
    cfg.validate()
    model, adapter_dir = reft.model, Path(adapter_dir)
    world = mx.distributed.init()
    is_main = world.rank() == 0
    callbacks = list(callbacks) if is_main else []
    check_enough(train_set, cfg.batch_size, "train")
    if valid_set:
        check_enough(valid_set, 1, "valid")

    per_epoch = steps_per_epoch(train_set, cfg.batch_size, world.size())  # checks batch_size % world size
    total_steps = cfg.iters or cfg.epochs * per_epoch
    accum = cfg.grad_accumulation_steps
    optimizer = make_optimizer(cfg, math.ceil(total_steps / accum))
    optimizer.init(model.trainable_parameters())
    start, history, trained_tokens = 0, [], 0  # trained_tokens: all ranks' tokens before this run's steps
    saved = load_checkpoint(reft, optimizer, resume_from) if resume_from is not None and is_main else None
    if world.size() > 1:
        saved = _share_main_state(reft, optimizer, saved)  # rank 0 decides whether and where to resume
    if saved is not None:
        start, history, trained_tokens = saved["step"], saved["history"], saved["trained_tokens"]
    step_fn, state = _make_step(reft, optimizer, cfg)
    adapter_kw = {"base_model": base_model, "extra": adapter_extra}
    stats = reft.stats()
    args_record = {"train": cfg.to_dict(), "reft": reft.config.to_dict(), "base_model": base_model, "total_steps": total_steps}

    def save_final(path: Path) -> Path:
        def extras(tmp: Path) -> None:
            (tmp / "training_args.json").write_text(json.dumps(args_record, indent=2))
            write_metrics(history, tmp / "metrics.jsonl")
            plot_loss(history, tmp / "loss.png")

        return save_adapter(reft, path, write_extras=extras, keep=(CHECKPOINTS,), **adapter_kw) if is_main else path

    def run_eval(step: int, split: str, examples) -> dict:
        release_cached_memory()  # the training step's buffers are not needed while evaluating, nor eval's after
        m = evaluate_loss(model, examples, cfg.batch_size, reft=reft, pad_id=pad_id,
                          max_batches=cfg.max_eval_batches if split == "valid" else 0)
        if split == "test" and test_metrics_fn is not None:
            m.update(test_metrics_fn(examples))
        release_cached_memory()
        row = {"kind": "eval", "split": split, "step": step, **m}
        history.append(row)
        for cb in callbacks:
            cb.on_eval(row)
        return row

    for cb in callbacks:
        cb.on_train_start({
            "total_steps": total_steps, "start_step": start, "trainable": stats.trainable,
            "total_parameters": stats.total, "percent": stats.percent, "notes": _run_notes(cfg, world.size()),
            **args_record,
        })

    model.train()
    carry, stopped, last_checkpoint = None, False, latest_checkpoint(adapter_dir)
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
    train_time, steps_done, seen_tokens = 0.0, 0, 0  # seen_tokens: all ranks' tokens in this run's steps
    # The next step is queued before this one's loss is read, so the device never waits for the host's
    # bookkeeping; a step whose evaluation or checkpoint needs the weights right after it is read before
    # anything else is queued. A stop rolls the queued step back, so training ends exactly where asked.
    ahead = 1 + QUEUE_AHEAD

    def eval_due(done: int) -> bool:
        return bool(valid_set and cfg.steps_per_eval and done % cfg.steps_per_eval == 0) and done < total_steps

    def checkpoint_due(done: int) -> bool:
        return bool(cfg.save_every and done % cfg.save_every == 0) and done < total_steps

    def needs_weights(done: int) -> bool:  # what runs after this step must see the weights as it left them
        return done == total_steps or eval_due(done) or checkpoint_due(done)

    def dispatch(step: int, inputs: tuple) -> tuple:
        nonlocal carry
        # references to the state before this step (arrays are immutable), to roll it back on a stop
        before = (reft.parameters(), tree_map(lambda x: x, optimizer.state), carry)  # a flat dict: cheaper to take
        # dropout keys depend on (seed, step, rank) alone: resumable, and ranks draw different masks
        mx.random.seed((cfg.seed * 1_000_003 + step) * world.size() + world.rank())
        do_update = (step + 1) % accum == 0 or step + 1 == total_steps
        *results, carry = step_fn(*inputs, carry, do_update)
        mx.async_eval(state, results, carry)
        return step, results, before

    def roll_back(before: tuple) -> None:
        nonlocal carry
        params, optimizer.state, carry = before
        reft.load_parameters(params)

    stream = _staged(_batch_stream(train_set, cfg, start, total_steps, pad_id), reft)
    pending = next(stream, None)
    queued: list[tuple] = []
    late_vote = None  # several processes: the stop vote taken after the step before the one being read
    tic = time.perf_counter()
    while pending is not None or queued:
        if pending is not None and not stopped and len(queued) < ahead and not (queued and needs_weights(queued[-1][0] + 1)):
            queued.append(dispatch(*pending))
            pending = next(stream, None)  # prepare the next batch on the host while the device works
            continue
        if not queued:  # stopped with batches left
            break
        step, results, before = queued.pop(0)
        if late_vote is not None and late_vote.item() > 0:  # a rank asked to stop before this step: undo it
            roll_back(before)
            queued.clear()
            stopped = True
            break
        late_vote = None
        loss, targets, tokens, lr = results
        loss_value, targets_value, tokens_value = loss.item(), int(targets.item()), int(tokens.item())
        now = time.perf_counter()
        elapsed, tic = now - tic, now
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(_non_finite_message(f"loss became {loss_value}", step + 1, last_checkpoint, cfg))
        seen_tokens += tokens_value
        train_time += elapsed
        steps_done += 1
        window["loss"] += loss_value * targets_value
        window["targets"] += targets_value
        window["tokens"] += tokens_value
        window["time"] += elapsed
        done = step + 1
        for cb in callbacks:
            cb.on_step(done, total_steps)

        if done % cfg.steps_per_report == 0 or done == total_steps:
            row = {  # losses and counts are the global batch's: the step all-reduces them
                "kind": "train", "step": done, "epoch": step // per_epoch,
                "loss": window["loss"] / max(window["targets"], 1),
                "learning_rate": lr.item(),
                "tokens_per_sec": window["tokens"] / max(window["time"], 1e-9),  # every token of the rows, prompts too
                "supervised_tokens_per_sec": window["targets"] / max(window["time"], 1e-9),  # tokens the loss is on
                "trained_tokens": trained_tokens + seen_tokens,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "eta_s": (total_steps - done) * train_time / steps_done,
                "progress": done / total_steps,
            }
            history.append(row)
            for cb in callbacks:
                cb.on_report(row)
            window = dict.fromkeys(window, 0)

        if eval_due(done):
            run_eval(done, "valid", valid_set)
        if checkpoint_due(done) and carry is None:
            _check_finite(reft, done, last_checkpoint, cfg)  # this step's update may have gone bad: never save it
            folder = adapter_dir / CHECKPOINTS / f"step-{done:07d}"
            if is_main:  # only rank 0 writes; the others may not even share its disk
                release_cached_memory()
                save_checkpoint(reft, optimizer, folder, done, {"history": history, "trained_tokens": trained_tokens + seen_tokens}, **adapter_kw)
            last_checkpoint = folder
            for cb in callbacks:
                cb.on_checkpoint(done, folder)
        if needs_weights(done):
            tic = time.perf_counter()  # evaluation and checkpoint time is not training time
        asked = any(cb.should_stop() for cb in callbacks)
        if world.size() > 1 and queued:
            # reading the vote now would wait for the step queued behind it: read it with that step's loss
            late_vote = _vote_to_stop(asked)
        elif not stopped and (asked if world.size() == 1 else _vote_to_stop(asked).item() > 0):
            stopped = True
            if queued:  # undo the step queued behind this one
                roll_back(queued[0][2])
                queued.clear()

    final_step = start + steps_done
    _check_finite(reft, final_step, last_checkpoint, cfg)
    # a stop saves at once (the app may kill the process seconds later); a finished run evaluates first
    valid_metrics = run_eval(final_step, "valid", valid_set) if valid_set and not stopped else None
    release_cached_memory()
    path = save_final(adapter_dir)
    test_metrics = run_eval(final_step, "test", test_set) if test_set and not stopped else None
    summary = {
        "adapter": str(path), "steps": final_step, "total_steps": total_steps, "stopped": stopped,
        "train_loss": next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None),
        "valid": valid_metrics, "test": test_metrics, "trainable": stats.trainable,
        "total_parameters": stats.total, "train_time_s": train_time,
    }
    release_cached_memory()
    for cb in callbacks:
        cb.on_end(summary)
    return summary


def _run_notes(cfg: TrainConfig, world_size: int) -> list[str]:
    """Advice about this run's setting, shown when it starts."""
    rows = cfg.batch_size // world_size
    if world_size > 1 and mx.cuda.is_available() and rows < ROWS_PER_GPU_TO_SCALE:
        return [f"each of the {world_size} GPUs trains {rows} rows per step: with fewer than {ROWS_PER_GPU_TO_SCALE}, "
                f"queuing a step's kernels takes the host longer than the GPU takes to run them, and {world_size} GPUs "
                f"can be slower than one. A batch_size of {2 * ROWS_PER_GPU_TO_SCALE * world_size} keeps every GPU busy; "
                f"for this global batch, fewer GPUs train faster."]
    return []


def _non_finite_message(what: str, step: int, last_checkpoint: Path | None, cfg: TrainConfig) -> str:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been saved yet"
    return (f"{what} at step {step}; training stopped and {kept}. "
            f"Try a lower learning_rate (now {cfg.learning_rate}) or grad_clip > 0.")


def _check_finite(reft: Reft, step: int, last_checkpoint: Path | None, cfg: TrainConfig) -> None:
    """Raise NonFiniteLossError if an update left a NaN or infinity in the intervention weights."""
    if not all(mx.isfinite(v).all().item() for v in reft.parameters().values()):
        raise NonFiniteLossError(_non_finite_message("intervention weights became non-finite", step, last_checkpoint, cfg))


def _vote_to_stop(flag: bool) -> mx.array:
    """How many ranks ask to stop (queued on the device, not read): all ranks leave the loop together."""
    vote = mx.distributed.all_sum(mx.array(int(flag)))
    mx.async_eval(vote)
    return vote
