"""The NAMM policy step: state carry across updates, keep-all at zero parameters, population vmap."""

import numpy as np
import pytest
import scipy.signal

import jax
import jax.numpy as jnp

from namm import policy, scoring
from namm.config import NAMMConfig
from namm.features import NormParams, NormStats

CFG = NAMMConfig()
H, C = 2, 48
RNG = np.random.default_rng(2)


def causal_rows(first: int, n: int, n_keys: int) -> np.ndarray:
    """[H, n, C] attention-like rows: query at position first+q attends keys 0..first+q (rows sum to 1)."""
    rows = RNG.random((H, n, C)).astype(np.float32)
    for q in range(n):
        rows[:, q, first + q + 1:] = 0.0
    rows[:, :, n_keys:] = 0.0
    return rows / rows.sum(-1, keepdims=True)


ROWS1 = causal_rows(0, 32, 32)          # update 1: tokens 0..31 in slots 0..31
ROWS2 = causal_rows(32, 16, 48)         # update 2: tokens 32..47 in slots 32..47
POS = jnp.arange(C, dtype=jnp.int32)
VALID1 = jnp.asarray(np.arange(C) < 32)[None].repeat(H, 0)
VALID2 = jnp.ones((H, C), bool)
STEP = jax.jit(policy.make_update(CFG))


def two_updates(params):
    s0 = policy.init_state(H, C, CFG)
    s1, _, k1 = STEP(params, s0, jnp.asarray(ROWS1), POS, VALID1)
    s2, scores, k2 = STEP(params, s1, jnp.asarray(ROWS2), POS, VALID2 & (k1 | ~VALID1))
    return s1, k1, s2, scores, k2


def test_two_updates_equal_one_uninterrupted_stft_and_zero_params_keep_all():
    s1, k1, s2, scores, k2 = two_updates(scoring.zeros(CFG))
    np.testing.assert_array_equal(k1, VALID1)                      # all-zero NAMM keeps every token
    np.testing.assert_array_equal(k2, VALID2)
    np.testing.assert_array_equal(scores, 0.0)
    # Reference: one STFT over the whole series [16 zeros | 48 queries] of every key, EMA over its
    # 3 frames, key k counted from frame k // 16 on (it does not exist before its block).
    series = np.concatenate([np.zeros((H, C, 16)), ROWS1.transpose(0, 2, 1), ROWS2.transpose(0, 2, 1)], -1)
    win = scipy.signal.get_window("hann", 32, fftbins=True)
    beta, ema = 0.99 ** 16, np.zeros((H, C, 17))
    for t in range(3):
        spec = np.abs(np.fft.rfft(series[..., 16 * t:16 * t + 32] * win, axis=-1))
        m = (t >= np.arange(C) // 16)[None, :, None]
        ema = beta * ema + (1 - beta) * m * spec
    np.testing.assert_allclose(s2.ema, ema, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s2.left_context, series[..., -16:], atol=1e-7)   # carried context
    np.testing.assert_array_equal(s1.left_context[:, 32:], 0.0)                 # empty slots: nothing
    np.testing.assert_array_equal(s2.positions, np.broadcast_to(np.arange(C), (H, C)))
    # The stored EMA is the calibration input of the normalisation statistics.
    stats = NormStats.init(17).update(s2.ema, s2.valid)
    assert float(stats.count) == H * C


def test_random_params_evict_and_reused_slots_start_fresh():
    params = jnp.asarray(np.random.default_rng(4).normal(0, 0.5, scoring.num_params(CFG)), jnp.float32)
    params = params.at[-1].set(-6.0)                               # head.bias: many tokens score < 0
    s1, k1, s2, scores, k2 = two_updates(params)
    counts = np.asarray(k1).sum(-1)
    assert counts[0] == counts[1] and 1 <= counts[0] < 32           # ragged_max: same count per head
    assert bool(k1[:, 31].all())                                   # the newest token is always kept
    np.testing.assert_array_equal(s1.ema[~np.asarray(k1)], 0.0)    # evicted slots are freed
    # Reuse a freed slot for a new token: it must restart from zero EMA / zero left context.
    free = int(np.nonzero(~np.asarray(k1[0]))[0][0])
    pos, is_new, recency, newest = policy.slot_info(s1, POS.at[free].set(100), VALID1.at[:, free].set(True))
    assert bool(is_new[0, free]) and int(recency[0, free]) == 0 and bool(newest[0, free])
    assert not bool(is_new[0, 31])


def test_vmapped_population_equals_separate_calls():
    pop = jnp.asarray(np.random.default_rng(5).normal(0, 0.3, (32, scoring.num_params(CFG))), jnp.float32)
    s1 = STEP(scoring.zeros(CFG), policy.init_state(H, C, CFG), jnp.asarray(ROWS1), POS, VALID1)[0]
    norm = NormParams(jnp.full((17,), 0.01), jnp.full((17,), 4e-4))
    step = jax.jit(policy.make_update(CFG, norm))
    vstep = jax.jit(jax.vmap(policy.make_update(CFG, norm), in_axes=(0, None, None, None, None)))
    vs, vscores, vkeep = vstep(pop, s1, jnp.asarray(ROWS2), POS, VALID2)
    for i in range(32):
        s, sc, k = step(pop[i], s1, jnp.asarray(ROWS2), POS, VALID2)
        np.testing.assert_allclose(vscores[i], sc, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(vkeep[i], k)
        np.testing.assert_allclose(vs.ema[i], s.ema, rtol=1e-6, atol=1e-7)
    assert len({int(k) for k in np.asarray(vkeep).sum((1, 2))}) > 1  # members really differ


def test_bad_inputs_fail_early():
    s0 = policy.init_state(H, C, CFG)
    with pytest.raises(ValueError, match="multiple of hop"):
        policy.update(scoring.zeros(CFG), None, s0, jnp.zeros((H, 8, C)), POS, VALID1, CFG)
    with pytest.raises(ValueError, match="GQA-average"):
        policy.update(scoring.zeros(CFG), None, s0, jnp.zeros((6, 16, C)), POS, VALID1, CFG)
