"""Speed levers, each switchable off so that one run measures the step with and without it.

Every lever is on in the library. Turning one off uses the plain computation instead, through the
trainer's LoopOptions (loss, logits, rotations, compile) or Reft.set_apply (how the edit is applied).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn

from loreft.loss import completion_loss, token_cross_entropy
from loreft.model import apply_interventions
from loreft.trainer import LoopOptions

# name -> what turning it off does; the bench's variants are "ours" with a subset switched off.
LEVERS = {
    "compile": "run the step eagerly (no mx.compile)",
    "sparse_logits": "compute the LM head on every position, not just the supervised ones",
    "batched_rotations": "orthonormalize each intervention's R separately, on every call",
    "gather": "edit every position (masked) instead of only the picked rows",
    "select_matmul": "pick and write back the edited rows with gather/scatter kernels, not 0/1 matmuls",
    "fused_scatter": "gather and scatter once per group instead of once per layer (implies select_matmul off)",
    "stacked_groups": "edit a layer's first and last groups one after the other, not in one stacked pass",
    "fused_ce": "cross-entropy through nn.losses.cross_entropy's generic gradient",
    "head_grad": "keep the LM head's logits for the backward pass (no gradient worked out in the forward, no chunks)",
    "row_shards": "a CPU step's rows on one stream (not split over CPU streams that run at once)",
}


def plain_cross_entropy(logits, targets):
    """Per-token cross-entropy through MLX's generic gradient (same value as loreft.loss.token_cross_entropy)."""
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets)


def masked_apply_interventions(h, interventions, locations, offset=0):
    """The edit computed at every position, kept where a (B, L) 0/1 mask says (the dense alternative)."""
    L = h.shape[1]
    if isinstance(offset, mx.array) and offset.ndim == 1:
        offset = offset[:, None]
    positions = mx.arange(L)[None, :, None]  # (1, L, 1)
    for name, intervention in interventions.items():
        idx, valid = locations.groups[name]
        hit = (positions == (idx - offset)[:, None, :]) * valid[:, None, :]  # (B, L, n)
        mask = hit.sum(axis=-1, keepdims=True)  # (B, L, 1)
        delta = intervention(h).astype(mx.float32) - h.astype(mx.float32)
        h = (h.astype(mx.float32) + delta * mask).astype(h.dtype)
    return h


def gather_apply_interventions(h, interventions, locations, offset=0):
    """The edit through take_along_axis / .at[].add (gather and scatter kernels), once per layer."""
    B, L, _ = h.shape
    if isinstance(offset, mx.array) and offset.ndim == 1:
        offset = offset[:, None]
    names = list(interventions)
    groups = [locations.groups[n] for n in names]
    idx = mx.concatenate([g[0] for g in groups], axis=1)
    valid = mx.concatenate([g[1] for g in groups], axis=1)
    local = idx - offset
    valid = valid * ((local >= 0) & (local < L))
    local = mx.clip(local, 0, L - 1)
    picked = mx.take_along_axis(h, local[..., None], axis=1)
    edited, start = [], 0
    for name, (group_idx, _) in zip(names, groups):
        stop = start + group_idx.shape[1]
        edited.append(interventions[name](picked[:, start:stop]))
        start = stop
    edited = mx.concatenate(edited, axis=1)
    delta = (edited.astype(mx.float32) - picked.astype(mx.float32)) * valid[..., None]
    return h.at[mx.arange(B)[:, None], local].add(delta.astype(h.dtype))


def per_group_apply_interventions(h, interventions, locations, offset=0):
    """One gather and one scatter per intervention group (loreft.model.apply_interventions fuses them)."""
    B, L, _ = h.shape
    rows = mx.arange(B)[:, None]
    if isinstance(offset, mx.array) and offset.ndim == 1:
        offset = offset[:, None]
    for name, intervention in interventions.items():
        idx, valid = locations.groups[name]
        local = idx - offset
        valid = valid * ((local >= 0) & (local < L))
        local = mx.clip(local, 0, L - 1)
        picked = mx.take_along_axis(h, local[..., None], axis=1)
        delta = (intervention(picked).astype(mx.float32) - picked.astype(mx.float32)) * valid[..., None]
        h = h.at[rows, local].add(delta.astype(h.dtype))
    return h


def check(names: Iterable[str]) -> set[str]:
    """The named levers as a set; unknown names are an error."""
    names = set(names)
    unknown = names - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; known: {sorted(LEVERS)}")
    return names


def loop_options(off: Iterable[str]) -> LoopOptions:
    """The trainer's LoopOptions with the named step levers off."""
    off = check(off)
    ce = plain_cross_entropy if "fused_ce" in off else token_cross_entropy
    head_loss = (lambda head, h, t: ce(head(h), t)) if {"fused_ce", "head_grad"} & off else None
    loss = partial(completion_loss, cross_entropy=ce, head_loss=head_loss)
    return LoopOptions(loss=loss, sparse_logits="sparse_logits" not in off,
                       batched_rotations="batched_rotations" not in off, compiled="compile" not in off,
                       cpu_streams=1 if "row_shards" in off else LoopOptions.cpu_streams)


def apply_function(off: Iterable[str]):
    """What Reft.set_apply gets for the named edit levers off (None: the library's apply_interventions)."""
    off = check(off)
    if "gather" in off:
        return masked_apply_interventions
    if "fused_scatter" in off:
        return per_group_apply_interventions
    if "select_matmul" in off:
        return gather_apply_interventions
    if "stacked_groups" in off:
        return partial(apply_interventions, stack_groups=False)
    return None
