"""Speed levers, each switchable off so that one run measures the step with and without it.

Every lever is on in the library. Turning one off swaps in the code path the library had before it
(kept here verbatim, as the "before" of each measurement) for the duration of a step call.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn

import loreft.model as model_module
import loreft.trainer as trainer_module

# name -> what turning it off does; the bench's variants are "ours" with a subset switched off.
LEVERS = {
    "compile": "run the step eagerly (no mx.compile)",
    "sparse_logits": "compute the LM head on every position, not just the supervised ones",
    "batched_rotations": "orthonormalize each intervention's R separately, on every call",
    "gather": "edit every position (masked) instead of only the picked rows",
    "select_matmul": "pick and write back the edited rows with gather/scatter kernels, not 0/1 matmuls",
    "fused_scatter": "gather and scatter once per group instead of once per layer (implies select_matmul off)",
    "fused_ce": "cross-entropy through nn.losses.cross_entropy's generic gradient",
}


def plain_cross_entropy(logits, targets):
    """loreft.trainer's per-token cross-entropy before this work (same value, generic vjp)."""
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
    """loreft.model.apply_interventions before this work: one gather and one scatter per group."""
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


@contextlib.contextmanager
def levers_off(names: Iterable[str]):
    """Switch the named levers off (except 'compile', which is chosen when the step is built)."""
    names = set(names)
    unknown = names - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; known: {sorted(LEVERS)}")
    saved = []

    def swap(module, attr, value):
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)

    if "gather" in names:
        swap(model_module, "apply_interventions", masked_apply_interventions)
    elif "fused_scatter" in names:
        swap(model_module, "apply_interventions", per_group_apply_interventions)
    elif "select_matmul" in names:
        swap(model_module, "apply_interventions", gather_apply_interventions)
    if "batched_rotations" in names:
        swap(trainer_module, "batched_rotations", lambda _ivs: contextlib.nullcontext())
    if "fused_ce" in names:
        swap(trainer_module, "token_cross_entropy", plain_cross_entropy)
    if "sparse_logits" in names:
        swap(trainer_module, "output_head", lambda _model: None)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
