"""Threshold selection: ties at 0, newest forced, padding dropped, ragged-max K rule, top-k cap."""

import numpy as np

import jax.numpy as jnp

from namm.config import SelectionConfig
from namm.selection import kept_indices, newest_mask, rank_desc, select

MASKED = SelectionConfig(mode="masked")
RAGGED = SelectionConfig(mode="ragged_max")


def run(scores, valid, newest, cfg):
    return np.asarray(select(jnp.asarray(scores, jnp.float32), jnp.asarray(valid), jnp.asarray(newest), cfg))


def test_threshold_ties_at_zero_are_kept():
    scores = [[0.0, -1e-9, 1e-9, -0.0, -3.0]]
    keep = run(scores, [[True] * 5], [[False] * 4 + [True]], MASKED)
    np.testing.assert_array_equal(keep, [[True, False, True, True, True]])   # newest kept at -3


def test_padding_dropped_and_newest_forced():
    scores = [[5.0, 2.0, -1.0, -7.0]]
    valid = [[False, True, True, True]]
    newest = [[False, False, False, True]]
    for cfg in (MASKED, RAGGED):
        np.testing.assert_array_equal(run(scores, valid, newest, cfg), [[False, True, False, True]])


def test_ragged_max_fills_each_head_to_the_largest_count():
    # head 0 wants 3 (scores >= 0: slots 0, 2 and the newest 5); head 1 wants 1 (the newest);
    # head 2 wants 2 but slot 3 is padding. K = 3: head 1 also keeps its 2 best negatives
    # (-0.5 at slot 1, -1 at slot 4); head 2 keeps slots 0, 5 and its best negative (slot 2, -2).
    scores = [[1.0, -2.0, 0.0, -1.0, -4.0, -9.0],
              [-3.0, -0.5, -2.0, -5.0, -1.0, -9.0],
              [0.5, -3.0, -2.0, 9.0, -2.5, -9.0]]
    valid = np.ones((3, 6), bool)
    valid[2, 3] = False
    newest = np.zeros((3, 6), bool)
    newest[:, 5] = True
    keep = run(scores, valid, newest, RAGGED)
    np.testing.assert_array_equal(keep, [[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1], [1, 0, 1, 0, 0, 1]])
    masked = run(scores, valid, newest, MASKED)
    np.testing.assert_array_equal(masked.sum(-1), [3, 1, 2])
    np.testing.assert_array_equal(keep.sum(-1), [3, 3, 3])


def test_ragged_max_never_keeps_padding_even_below_k():
    scores = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    valid = [[True, True, True, True], [False, False, True, True]]
    newest = [[False, False, False, True], [False, False, False, True]]
    keep = run(scores, valid, newest, RAGGED)
    np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [0, 0, 1, 1]])


def test_top_k_cap_before_threshold():
    scores = [[3.0, 2.0, -1.0, 1.0, 0.0]]
    newest = [[False, False, False, False, True]]
    cfg = SelectionConfig(mode="masked", top_k=2)
    # top-2 by score: the newest (+inf) and slot 0; then the threshold keeps both.
    np.testing.assert_array_equal(run(scores, [[True] * 5], newest, cfg), [[1, 0, 0, 0, 1]])


def test_helpers():
    pos = jnp.asarray([[4, 9, 2, 7]])
    np.testing.assert_array_equal(newest_mask(pos, jnp.asarray([[True, False, True, True]])), [[0, 0, 0, 1]])
    np.testing.assert_array_equal(rank_desc(jnp.asarray([[0.5, 2.0, 0.5, -1.0]])), [[1, 0, 2, 3]])
    idx, ok = kept_indices(jnp.asarray([[False, True, False, True, True]]), 4)
    np.testing.assert_array_equal(idx, [[1, 3, 4, 0]])
    np.testing.assert_array_equal(ok, [[1, 1, 1, 0]])
