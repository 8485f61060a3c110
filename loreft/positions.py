"""Which prompt positions each intervention edits, per example of a ragged, padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class Locations:
    """Per-group position indices (B, n) and validity (B, n) for one batch; invalid slots are never edited."""

    groups: dict[str, tuple[mx.array, mx.array]]
    end: int = 1 << 30  # one past the last edited position (host int): later calls skip the edit

    def as_arrays(self) -> list[mx.array]:
        """Flat list of arrays, in group order (compiled functions take arrays, not dataclasses)."""
        return [a for idx, valid in self.groups.values() for a in (idx, valid)]

    @classmethod
    def from_arrays(cls, names: list[str], arrays: list[mx.array]) -> "Locations":
        """Inverse of as_arrays (inside a compiled step, where only arrays cross the boundary)."""
        return cls({n: (arrays[2 * i], arrays[2 * i + 1]) for i, n in enumerate(names)})


def clamp_counts(prompt_len: int, first_n: int, last_n: int) -> tuple[int, int]:
    """How many first / last positions a prompt of this length gets.

    With both sides asked for, each is clamped to half the prompt (as pyreft does) so they never overlap;
    with one side only, it is clamped to the prompt's length, so a one-token prompt is still edited.
    """
    if first_n and last_n:
        return min(first_n, prompt_len // 2), min(last_n, prompt_len // 2)
    return min(first_n, prompt_len), min(last_n, prompt_len)


def group_names(first_n: int, last_n: int, share_weights: bool) -> list[str]:
    """Names of the interventions each layer holds: 'first' / 'last' untied, 'shared' when tied."""
    if share_weights and first_n and last_n:
        return ["shared"]
    return [n for n, k in (("first", first_n), ("last", last_n)) if k]


def prompt_locations(
    prompt_lengths, first_n: int, last_n: int, share_weights: bool = False, offsets=None, host: bool = False
) -> Locations:
    """Locations of the first-n / last-n prompt tokens ("l1" is the last prompt token).

    prompt_lengths: (B,) true prompt lengths; offsets: (B,) index of each prompt's first token
    (left padding), default 0. Slot k of 'last' holds the k-th of the last n positions, in order.
    host=True keeps the arrays in numpy (the trainer uploads many batches' inputs at once).
    """
    lengths = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
    offs = np.zeros_like(lengths) if offsets is None else np.asarray(offsets, dtype=np.int64).reshape(-1)
    B = len(lengths)
    first_idx = np.zeros((B, first_n), np.int32)
    first_ok = np.zeros((B, first_n), np.float32)
    last_idx = np.zeros((B, last_n), np.int32)
    last_ok = np.zeros((B, last_n), np.float32)
    for b, (plen, off) in enumerate(zip(lengths, offs)):
        f, l = clamp_counts(int(plen), first_n, last_n)
        first_idx[b, :f] = off + np.arange(f)
        first_ok[b, :f] = 1.0
        last_idx[b, :l] = off + plen - l + np.arange(l)
        last_ok[b, :l] = 1.0
        first_idx[b, f:] = off  # padding slots point inside the prompt but are masked out
        last_idx[b, l:] = off
    groups = {}
    for name in group_names(first_n, last_n, share_weights):
        if name == "shared":
            idx, ok = np.concatenate([first_idx, last_idx], 1), np.concatenate([first_ok, last_ok], 1)
        elif name == "first":
            idx, ok = first_idx, first_ok
        else:
            idx, ok = last_idx, last_ok
        groups[name] = (idx, ok) if host else (mx.array(idx), mx.array(ok))
    end = int(max(offs + lengths)) if B else 0
    return Locations(groups, end)
