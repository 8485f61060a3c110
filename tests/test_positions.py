"""Which positions get edited: first-n / last-n of each prompt in ragged, padded batches."""

import mlx.core as mx
import numpy as np
import pytest

from loreft.model import apply_interventions
from loreft.interventions import LoreftIntervention
from loreft.positions import Locations, prompt_locations


def dense_mask(locations: Locations, seq_len: int) -> np.ndarray:
    """(B, seq_len) count of edits each position receives."""
    B = next(iter(locations.groups.values()))[0].shape[0]
    mask = np.zeros((B, seq_len), np.int32)
    for idx, ok in locations.groups.values():
        idx, ok = np.array(idx), np.array(ok)
        for b in range(B):
            for i, v in zip(idx[b], ok[b]):
                if v:
                    mask[b, i] += 1
    return mask


def expected_mask(lengths, first_n, last_n, seq_len, offsets=None):
    """The rule written out by hand: first-n / last-n prompt tokens, each clamped to half the prompt if both."""
    offsets = offsets or [0] * len(lengths)
    out = np.zeros((len(lengths), seq_len), np.int32)
    for b, (n, off) in enumerate(zip(lengths, offsets)):
        f, l = (min(first_n, n // 2), min(last_n, n // 2)) if first_n and last_n else (min(first_n, n), min(last_n, n))
        for p in range(f):
            out[b, off + p] += 1
        for p in range(n - l, n):
            out[b, off + p] += 1
    return out


def test_first_and_last_on_ragged_prompts():
    locs = prompt_locations([10, 3, 6, 1], 2, 2)
    assert dense_mask(locs, 12).tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # 10 tokens: 0,1 and 8,9
        [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # 3 tokens: clamped to 3 // 2 = 1 each side
        [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],  # 6 tokens: 0,1 and 4,5
        [0] * 12,  # 1 token with both sides: 1 // 2 = 0, nothing edited (pyreft's rule)
    ]


def test_both_sides_clamped_to_half_never_overlap():
    for n in range(1, 20):
        m = dense_mask(prompt_locations([n], 7, 7), 20)[0]
        assert m.max() <= 1  # no position edited twice
        assert m.sum() == 2 * min(7, n // 2)


@pytest.mark.parametrize("first_n,last_n", [(3, 0), (0, 3)])
def test_one_side_clamped_to_the_prompt(first_n, last_n):
    lengths = [5, 2, 1]
    m = dense_mask(prompt_locations(lengths, first_n, last_n), 8)
    assert m.tolist() == expected_mask(lengths, first_n, last_n, 8).tolist()
    assert m[2].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # a one-token prompt is still edited
    assert m.sum(1).tolist() == [3, 2, 1]


def test_l1_is_the_last_prompt_token():
    lengths = [4, 7, 1]
    m = dense_mask(prompt_locations(lengths, 0, 1), 10)
    for row, n in zip(m, lengths):
        assert row.tolist() == [int(i == n - 1) for i in range(10)]


def test_last_slots_are_in_order():
    idx, ok = prompt_locations([6, 3], 0, 3).groups["last"]
    assert np.array(idx).tolist() == [[3, 4, 5], [0, 1, 2]]
    assert np.array(ok).tolist() == [[1, 1, 1], [1, 1, 1]]
    idx, ok = prompt_locations([2], 0, 3).groups["last"]
    assert np.array(ok).tolist() == [[1, 1, 0]]  # the missing slot is marked invalid
    assert np.array(idx)[0, :2].tolist() == [0, 1]


@pytest.mark.parametrize("first_n,last_n", [(2, 3), (5, 5), (1, 0), (0, 4)])
def test_never_touches_completion_or_padding(first_n, last_n):
    lengths, seq = [7, 2, 5, 9], 14  # the rest of each row is completion, then right padding
    m = dense_mask(prompt_locations(lengths, first_n, last_n), seq)
    for row, n in zip(m, lengths):
        assert row[n:].sum() == 0
    assert m.tolist() == expected_mask(lengths, first_n, last_n, seq).tolist()


def test_left_padding_offsets():
    lengths, offsets, seq = [3, 6, 4], [3, 0, 2], 6
    locs = prompt_locations(lengths, 2, 1, offsets=offsets)
    m = dense_mask(locs, seq)
    assert m.tolist() == [
        [0, 0, 0, 1, 0, 1],  # padding 0..2, prompt 3..5: first 3 (3 // 2 = 1), last 5
        [1, 1, 0, 0, 0, 1],
        [0, 0, 1, 1, 0, 1],  # prompt 2..5: first 2,3, last 5
    ]
    for row, off in zip(m, offsets):
        assert row[:off].sum() == 0
    assert locs.end == 6


def test_tied_and_untied_groups():
    lengths = [8, 3]
    untied = prompt_locations(lengths, 2, 2, share_weights=False)
    tied = prompt_locations(lengths, 2, 2, share_weights=True)
    assert list(untied.groups) == ["first", "last"] and list(tied.groups) == ["shared"]
    assert dense_mask(tied, 8).tolist() == dense_mask(untied, 8).tolist() == expected_mask(lengths, 2, 2, 8).tolist()
    idx, ok = tied.groups["shared"]
    assert idx.shape == (2, 4) and ok.shape == (2, 4)
    # One side only: tying has nothing to share, so there is one group either way.
    assert list(prompt_locations(lengths, 0, 1, share_weights=True).groups) == ["last"]
    assert list(prompt_locations(lengths, 3, 0, share_weights=True).groups) == ["first"]


def test_end_is_one_past_the_last_prompt_token():
    assert prompt_locations([3, 9, 4], 1, 1).end == 9
    assert prompt_locations([3, 4], 1, 1, offsets=[6, 0]).end == 9


def test_apply_edits_exactly_the_masked_positions():
    """Through the block-output edit: masked positions get intervention(h), every other position is untouched."""
    d = 16
    lengths, offsets, seq = [5, 2, 7], [2, 0, 0], 9
    iv = LoreftIntervention(d, 2, key=mx.random.key(3))
    iv.eval()
    h = mx.array(np.random.default_rng(0).standard_normal((3, seq, d)).astype(np.float32))
    for first_n, last_n, tied in [(2, 2, False), (2, 2, True), (0, 1, False), (3, 0, False)]:
        locs = prompt_locations(lengths, first_n, last_n, share_weights=tied, offsets=offsets)
        out = np.array(apply_interventions(h, {g: iv for g in locs.groups}, locs))
        full = np.array(iv(h))  # the edit applied everywhere
        mask = dense_mask(locs, seq).astype(bool)
        np.testing.assert_array_equal(out[~mask], np.array(h)[~mask])
        np.testing.assert_allclose(out[mask], full[mask], rtol=1e-5, atol=1e-5)
        assert mask.sum() == expected_mask(lengths, first_n, last_n, seq, offsets).sum() > 0


def test_apply_with_cache_offset_edits_only_positions_inside_the_chunk():
    """A prefill chunk starting at absolute position `offset` edits the chunk's share of the positions."""
    d, seq = 8, 10
    iv = LoreftIntervention(d, 2, key=mx.random.key(4))
    iv.eval()
    h = mx.array(np.random.default_rng(1).standard_normal((1, seq, d)).astype(np.float32))
    locs = prompt_locations([seq], 2, 3)  # absolute positions 0,1 and 7,8,9
    whole = np.array(apply_interventions(h, {g: iv for g in locs.groups}, locs))
    parts = [np.array(apply_interventions(h[:, a:b], {g: iv for g in locs.groups}, locs, offset=a))
             for a, b in [(0, 4), (4, 8), (8, 10)]]
    np.testing.assert_array_equal(np.concatenate(parts, 1), whole)


@pytest.mark.parametrize("share", [False, True])
def test_host_locations_are_numpy_with_the_same_positions(share):
    lengths, offsets = [10, 3, 6, 1], [0, 2, 1, 4]
    host = prompt_locations(lengths, 3, 2, share, offsets, host=True)
    assert all(isinstance(a, np.ndarray) for pair in host.groups.values() for a in pair)
    assert list(host.groups) == list(prompt_locations(lengths, 3, 2, share, offsets).groups)
    assert np.array_equal(dense_mask(host, 12), expected_mask(lengths, 3, 2, 12, offsets))
    assert host.end == prompt_locations(lengths, 3, 2, share, offsets).end
