"""The training loss: next-token cross-entropy summed over completion tokens, with the LM head run only where it counts."""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels
from .data import Batch
from .model import Reft

PAD_TO = 32  # round batch lengths up so the compiled step sees few distinct shapes


@mx.custom_function
def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Next-token cross-entropy per position, in float32 from logits of any dtype (nn.losses.cross_entropy's value)."""
    return _logsumexp(logits.astype(mx.float32)) - _picked(logits, targets)


FLAT_INDEX_LIMIT = 2**31  # int32 flat indices into logits this large would overflow: take_along_axis there


def _picked(logits: mx.array, targets: mx.array) -> mx.array:
    """Each row's logit of its target, in float32 (no gradient: the losses below give their own)."""
    width, rows = logits.shape[-1], targets.size
    if rows * width >= FLAT_INDEX_LIMIT:
        return mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1).astype(mx.float32)
    # a gather by flat index: on CUDA the kernel the embedding lookup compiled already (a gather of this dtype by
    # int32), where take_along_axis is one more to compile on a cold start. The row offsets are a host constant,
    # and the cast is kept apart from what the caller does next (mx.contiguous: no fusion across it); either
    # would otherwise be one more fused kernel
    flat = targets.reshape(-1) + mx.array(np.arange(rows, dtype=np.int32) * width)
    return mx.contiguous(mx.take(logits.reshape(-1), flat).reshape(targets.shape).astype(mx.float32))


def _one_hot(x: mx.array, targets: mx.array) -> mx.array:
    return mx.arange(x.shape[-1]) == targets[..., None]


def _logit_grad(x: mx.array, lse: mx.array, targets: mx.array) -> mx.array:
    """softmax(x) - one_hot(targets): each row's cross-entropy gradient in its logits, as one elementwise pass."""
    return mx.exp(x - lse[..., None]) - _one_hot(x, targets)


def _vectorized_cpu() -> bool:
    """Whether exp runs faster in this process's fused kernels than in MLX's own CPU ops (cpu_kernels)."""
    return cpu_kernels.active() and mx.default_device() == mx.cpu


def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Each row's logsumexp, exp(x - the row's max) and that exp's row sums: one exp pass over x."""
    top = x.max(axis=-1, keepdims=True)
    e = mx.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    return (mx.log(total) + top).squeeze(-1), e, total


@mx.compile
def _fused_logsumexp(x: mx.array) -> mx.array:
    return _exp_parts(x)[0]


def _logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis; on a CPU with vectorized fused kernels, its exp runs in one of them."""
    # MLX's CPU logsumexp evaluates exp with scalar code; exp(x - max) as a compiled elementwise op runs in a
    # kernel g++ vectorizes (cpu_kernels): several times faster on a (tokens, vocab) array. Compiled here so
    # the evaluation loss (not in a compiled step) gets the fused kernel too.
    return _fused_logsumexp(x) if _vectorized_cpu() else mx.logsumexp(x, axis=-1)


@mx.compile
def _fused_logsumexp_and_grad(x: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    lse, e, total = _exp_parts(x)
    return lse, e / total - _one_hot(x, targets)


def _logsumexp_and_grad(x: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """(each row's logsumexp, softmax(x) - one_hot(targets)); on a CPU with vectorized fused kernels, one exp pass for both."""
    # a fused CPU kernel with a per-row operand (the row's max) runs scalar code: exp is most of the loss's
    # time there, so the gradient reuses the logsumexp's exponentials instead of computing them again
    if _vectorized_cpu():
        return _fused_logsumexp_and_grad(x, targets)
    lse = mx.logsumexp(x, axis=-1)
    return lse, _logit_grad(x, lse, targets)


@token_cross_entropy.vjp
def _token_cross_entropy_vjp(primals, cotangent, output):
    # softmax - one_hot in one fused elementwise pass over the logits, straight to their dtype: the generic
    # vjp keeps float32 logits alive and adds a scattered one-hot, several passes over a (tokens, vocab) array
    logits, targets = primals
    x = logits.astype(mx.float32)
    grad = _logit_grad(x, output + _picked(logits, targets), targets) * cotangent[..., None]
    return grad.astype(logits.dtype), mx.zeros_like(targets)


# head_cross_entropy makes at most about this many logits at once (4 GB in float32). On an H200, every token of
# 8 x 512 rows with Qwen2's 152k vocabulary: one chunk ran as fast as keeping the logits for the backward pass
# (median of 3 alternating jobs 91k and 90k tokens/s) with 0.6 GB less MLX peak; 32 chunks saved 2.1 GB in a
# single job that ran at 61k, within jobs' spread (59-98k) but not shown to be free, so chunks wait for big logits.
HEAD_CHUNK_ELEMENTS = 1 << 30


def head_cross_entropy(head: Callable, hidden: mx.array, targets: mx.array) -> mx.array:
    """token_cross_entropy(head(hidden), targets) for (n, d) hidden states, with the gradient worked out in the
    same pass: no logits are kept for the backward pass.

    The loss ends the graph, so the logits' gradient (softmax - one_hot, per unit of each row's cotangent) is
    known as soon as the logits are, and its product with the head's transpose is all the backward pass needs:
    one (n, d) array instead of (n, vocab) logits kept alive (the same two matmuls, no recompute). Rows go
    through in chunks of about HEAD_CHUNK_ELEMENTS logits. The head's own weights get no gradient here: the base
    model is frozen.
    """
    n = hidden.shape[0]
    chunks = max(1, -(-n * _vocab_size(head, hidden) // HEAD_CHUNK_ELEMENTS))
    while n % chunks:  # equal chunks: one shape, one set of compiled kernels
        chunks += 1
    rows = n // chunks

    @mx.custom_function
    def loss_and_input_grad(h, t):
        losses, grads = [], []
        for start in range(0, n, rows):
            h_part, t_part = h[start:start + rows], t[start:start + rows]
            if grads:  # a chunk's logits wait for the previous chunk's gradient, in whatever order MLX evaluates
                h_part = mx.depends(h_part, grads[-1])
            logits = head(h_part)
            x = logits.astype(mx.float32)
            lse, logit_grad = _logsumexp_and_grad(x, t_part)
            grads.append(mx.vjp(head, [h_part], [logit_grad.astype(logits.dtype)])[1][0])
            # the loss waits for the gradient: both are done with a chunk's logits before the next chunk starts
            losses.append(mx.depends(lse - _picked(logits, t_part), grads[-1]))
        return mx.concatenate(losses), mx.concatenate(grads)

    @loss_and_input_grad.vjp
    def _(primals, cotangents, outputs):
        return cotangents[0][:, None].astype(outputs[1].dtype) * outputs[1], mx.zeros_like(primals[1])

    return loss_and_input_grad(hidden, targets)[0]


def _vocab_size(head: Callable, hidden: mx.array) -> int:
    """The head's output width: MLX knows a lazy result's shape without computing it (the node is never evaluated)."""
    return head(hidden[:1]).shape[-1]


def completion_loss(
    model: nn.Module, tokens: mx.array, mask: mx.array, supervised: mx.array | None = None,
    split: tuple[Callable, Callable] | None = None, cross_entropy: Callable = token_cross_entropy,
    head_loss: Callable | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of next-token cross-entropy over the masked targets, number of targets).

    With split (split_at_head of the model) the LM head's loss is head_loss (default head_cross_entropy: no
    logits kept for the backward pass), and with supervised (supervised_positions of the mask and targets) the
    head runs only at the supervised positions: the same loss, without the vocabulary-sized logits of the others.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if split is None:
        ce = cross_entropy(model(inputs), targets) * mask
        return ce.sum(), mask.sum()
    body, lm_head = split
    head_loss = head_loss or head_cross_entropy
    hidden = body(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if supervised is None:  # (nearly) every token supervised: every row through the head
        ce = head_loss(lm_head, hidden, targets.reshape(-1)) * mask.reshape(-1)
        return ce.sum(), mask.sum()
    positions, picked_targets, inverse = unpack_supervised(supervised, hidden.shape[0])
    hidden = _take_rows(hidden, positions, inverse)  # (n_supervised, d)
    count = mask.sum()
    weights = mx.arange(positions.shape[0]) < count  # the supervised targets come first, then padding
    ce = head_loss(lm_head, hidden, picked_targets)
    return (ce * weights).sum(), count


def split_at_head(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(body, head) with model(x) == head(body(x)), checked on a few tokens; None where unsure.

    Covers mlx-lm's usual layout: model.model gives the final hidden states, then lm_head or the tied
    embedding (embed_tokens.as_linear), with gemma-style final logit softcapping. Anything else (an
    extra scale, a wrapper) fails the check, and the loss then computes the full logits.
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
    # uncompiled: the model's own compiled helpers would otherwise build kernels for this tiny shape (on CUDA,
    # seconds each on a cold start) that training never uses
    compiling = os.environ.get("MLX_DISABLE_COMPILE", "") in ("", "0")
    mx.disable_compile()
    try:
        probe = mx.array([[1, 2, 3, 0, 1]])
        want, got = model(probe), head(body(probe))
        same = want.shape == got.shape and mx.allclose(want.astype(mx.float32), got.astype(mx.float32), rtol=1e-5, atol=1e-5).item()
    except Exception:  # an unusual signature or output: stay on the full-logits path
        return None
    finally:
        if compiling:
            mx.enable_compile()
    return (body, head) if same else None


def _softcapped(head, cap: float):
    """gemma2-style final logit softcapping around an output head."""
    return lambda h: mx.tanh(head(h) / cap) * cap


def supervised_positions(mask: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """The supervised targets of a (B, T) loss mask, as one int32 array: [positions, targets, inverse].

    positions (n): the flat indices of the supervised targets, first, then padding with an unsupervised index
    (target 0, never counted) up to one of a few sizes n (1/64 .. 6/8 of B*T), so the compiled step sees few
    shapes; targets (n): the target tokens there, picked on the host so the step needs no gather kernel for
    them; inverse (B*T): for each flat index, its slot in positions, or n where it is not supervised (the
    backward pass gathers the rows' gradients back with it). None when more than 3/4 are supervised (the full
    logits then cost about the same). unpack_supervised takes it apart.
    """
    flat = mask.reshape(-1)
    hits = np.flatnonzero(flat)
    sizes = [flat.size // 64, flat.size // 32, flat.size // 16] + [flat.size * k // 8 for k in range(1, 7)]
    size = next((s for s in sizes if s >= max(len(hits), 1)), None)
    if size is None or len(hits) == flat.size:
        return None
    positions = np.concatenate([hits, np.full(size - len(hits), np.flatnonzero(flat == 0)[0])])
    picked = np.where(np.arange(size) < len(hits), targets.reshape(-1)[positions], 0)
    inverse = np.full(flat.size, size)
    inverse[hits] = np.arange(len(hits))
    return np.concatenate([positions, picked, inverse]).astype(np.int32)


def unpack_supervised(supervised: mx.array | np.ndarray, size: int) -> tuple:
    """(positions, targets, inverse) of supervised_positions' array for a mask of `size` targets (slices, no gathers)."""
    n = (supervised.shape[0] - size) // 2
    return supervised[:n], supervised[n:2 * n], supervised[2 * n:]


@mx.custom_function
def _take_rows(hidden: mx.array, positions: mx.array, inverse: mx.array) -> mx.array:
    """hidden[positions] for (N, d) hidden states, whose gradient is a gather too (inverse: supervised_positions')."""
    return mx.take(hidden, positions, axis=0)


@_take_rows.vjp
def _take_rows_vjp(primals, cotangent, output):
    # the supervised positions are distinct, so each row's gradient is one picked row's, or zero (the row after
    # the last): a gather, the kernel the forward uses (on CUDA, a scatter-add would be one more to compile).
    # Padding slots repeat an unsupervised index and get nothing back: completion_loss weighs them zero
    hidden, positions, inverse = primals
    padded = mx.concatenate([cotangent, mx.zeros((1, cotangent.shape[1]), cotangent.dtype)])
    return mx.take(padded, inverse, axis=0), mx.zeros_like(positions), mx.zeros_like(inverse)


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
        supervised = supervised_positions(mask, batch.tokens[:, 1:])
        total = np.array(batch.lengths.sum(), np.int32)
        arrays = [batch.tokens, mask, *reft.locations(batch.prompt_lengths, host=True).as_arrays(), supervised, total]
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
        tokens, mask, *locs, supervised, total = [view(e) for e in entries]
        staged.append((tokens, mask, locs, supervised, total))
    return staged
