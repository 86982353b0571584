"""Baselines: exact budgets, the newest token always kept, and hand-worked H2O / SnapKV examples."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from namm.baselines import BASELINES, make_baseline

from conftest import EPS32

H, C = 2, 40
RNG = np.random.default_rng(3)
ROWS = jnp.asarray(RNG.random((H, 16, C)), jnp.float32)
KEYS = jnp.asarray(RNG.normal(size=(H, C, 8)), jnp.float32)
POS = jnp.asarray(RNG.permutation(C), jnp.int32)           # slots hold tokens out of order
VALID = jnp.asarray(RNG.random((H, C)) < 0.8).at[:, int(jnp.argmax(POS))].set(True)


def call(policy, state, rows=ROWS, pos=POS, valid=VALID, **kw):
    return policy.update(None, state, rows, pos, valid, keys=KEYS, rng=jax.random.key(0), **kw)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("budget", [7, 0.25])
def test_every_baseline_keeps_exactly_its_budget_and_the_newest(name, budget):
    policy = make_baseline(name) if name == "full" else make_baseline(name, budget=budget)
    state = policy.init(H, C)
    _, scores, keep = call(policy, state)
    keep, valid = np.asarray(keep), np.asarray(VALID)
    assert scores.shape == (H, C) and not (keep & ~valid).any()
    n_valid = valid.sum(-1)
    want = n_valid if name == "full" else np.minimum(7 if budget == 7 else int(np.ceil(0.25 * C)), n_valid)
    np.testing.assert_array_equal(keep.sum(-1), want)
    assert keep[:, int(np.argmax(POS))].all()                  # newest (position C-1) kept in every head


def test_fraction_and_count_budgets_validated():
    for bad in (0, -3, 0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="budget"):
            make_baseline("h2o", budget=bad)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("tova", budget=4)
    with pytest.raises(ValueError, match="unknown option"):
        make_baseline("h2o", budget=4, window=3)
    with pytest.raises(ValueError, match="missing"):
        make_baseline("snapkv")
    with pytest.raises(ValueError, match="keys="):
        make_baseline("l2", budget=4).update(None, make_baseline("l2", budget=4).init(H, C), ROWS, POS, VALID)
    with pytest.raises(ValueError, match="rng="):
        make_baseline("random", budget=4).update(None, make_baseline("random", budget=4).init(H, C), ROWS, POS, VALID)


def test_h2o_accumulates_attention_across_updates():
    # Update 1: tokens 0..7 in slots 0..7; column sums of the attention (accumulated scores):
    acc1 = np.array([3.0, 0.1, 0.2, 2.0, 0.3, 0.1, 0.5, 0.4], np.float32)
    # budget 4 = recent window 2 (tokens 6, 7) + 2 heavy hitters among 0..5: tokens 0 (3.0) and 3 (2.0).
    policy = make_baseline("h2o", budget=4, recent_fraction=0.5)
    rows1 = jnp.asarray(np.stack([acc1 / 2, acc1 / 2])[None])        # [1, 2 queries, 8]
    s1, _, k1 = policy.update(None, policy.init(1, 8), rows1, jnp.arange(8), jnp.ones((1, 8), bool))
    np.testing.assert_array_equal(np.nonzero(np.asarray(k1[0]))[0], [0, 3, 6, 7])
    # Update 2: tokens 8, 9 go into the freed slots 1, 2. New attention (column sums):
    # slot 0: 0.0, slot 3: 0.5, slot 6: 1.2, slot 7: 2.0 -> accumulated 3.0, 2.5, 1.7, 2.4.
    # Recent window = tokens 8, 9; heavy hitters by *accumulated* attention = slots 0 and 3
    # (by the new attention alone it would be slots 7 and 6).
    acc2 = np.array([0.0, 0.3, 0.3, 0.5, 0.0, 0.0, 1.2, 2.0], np.float32)
    pos2 = jnp.asarray([0, 8, 9, 3, 4, 5, 6, 7])
    valid2 = jnp.asarray([[True, True, True, True, False, False, True, True]])
    s2, scores, k2 = policy.update(None, s1, jnp.asarray(np.stack([acc2 / 2, acc2 / 2])[None]), pos2, valid2)
    np.testing.assert_array_equal(np.nonzero(np.asarray(k2[0]))[0], [0, 1, 2, 3])
    # decimal halves rounded to float32 and accumulated over two updates: a few roundings of positive values
    np.testing.assert_allclose(scores[0, [0, 3, 6, 7]], [3.0, 2.5, 1.7, 2.4], rtol=4 * EPS32)
    # Fractional budget: 0.4 of the 10 tokens seen = 4 tokens, same choice.
    frac = make_baseline("h2o", budget=0.4)
    s1f = frac.update(None, frac.init(1, 8), rows1, jnp.arange(8), jnp.ones((1, 8), bool))[0]
    k2f = frac.update(None, s1f, jnp.asarray(np.stack([acc2 / 2, acc2 / 2])[None]), pos2, valid2)[2]
    np.testing.assert_array_equal(k2f, k2)


def test_snapkv_pools_observation_window_votes():
    # 10 tokens; the observation window is the last 2 queries (tokens 8, 9), whose votes are:
    votes = np.array([0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.5, 0.4, 0.0, 0.0], np.float32)
    # Max-pooled with kernel 3: [0, .9, .9, .9, 0, .5, .5, .5, ...]. Budget 5 = the 2 window tokens
    # + 3 more: tokens 1, 2, 3 (without pooling it would be 2, 6, 7).
    rows = np.zeros((1, 4, 10), np.float32)
    rows[0, 2:] = votes / 2                                           # only the last 2 of 4 queries vote
    rows[0, :2] = 1.0 - votes                                         # earlier queries: ignored
    policy = make_baseline("snapkv", budget=5, window=2, kernel=3)
    _, scores, keep = policy.update(None, policy.init(1, 10), jnp.asarray(rows), jnp.arange(10), jnp.ones((1, 10), bool))
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep[0]))[0], [1, 2, 3, 8, 9])
    # window votes: float32 sums of 2 decimal values <= 1, max-pooled (pooling copies exactly)
    np.testing.assert_allclose(scores[0, :8], [0, 0.9, 0.9, 0.9, 0, 0.5, 0.5, 0.5], rtol=0, atol=4 * EPS32)
    no_pool = make_baseline("snapkv", budget=5, window=2, kernel=1)
    keep1 = no_pool.update(None, no_pool.init(1, 10), jnp.asarray(rows), jnp.arange(10), jnp.ones((1, 10), bool))[2]
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep1[0]))[0], [2, 6, 7, 8, 9])


def test_l2_streamingllm_recency_pick_the_right_tokens():
    pos, valid = jnp.arange(10), jnp.ones((1, 10), bool)
    rows = jnp.zeros((1, 2, 10))
    norms = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 7.0, 9.0, 8.0], np.float32)
    keys = jnp.asarray(np.stack([norms, np.zeros(10)], -1)[None], jnp.float32)   # ||k|| = norms
    l2 = make_baseline("l2", budget=4)
    keep = l2.update(None, l2.init(1, 10), rows, pos, valid, keys=keys)[2]
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep[0]))[0], [1, 3, 5, 9])   # 3 lowest + newest
    skip = make_baseline("l2", budget=4, skip_layers=2)
    assert int(skip.update(None, skip.init(1, 10), rows, pos, valid, keys=keys, layer=1)[2].sum()) == 10
    assert int(skip.update(None, skip.init(1, 10), rows, pos, valid, keys=keys, layer=2)[2].sum()) == 4
    sllm = make_baseline("streamingllm", budget=6, sinks=2)
    keep = sllm.update(None, sllm.init(1, 10), rows, pos, valid)[2]
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep[0]))[0], [0, 1, 6, 7, 8, 9])
    rec = make_baseline("recency", budget=3)
    keep = rec.update(None, rec.init(1, 10), rows, pos, valid)[2]
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep[0]))[0], [7, 8, 9])
