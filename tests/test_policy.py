"""The NAMM policy step: state carry across updates, keep-all at zero parameters, population vmap."""

import numpy as np
import pytest
import scipy.signal

import jax
import jax.numpy as jnp

from namm import policy, scoring
from namm.config import NAMMConfig
from namm.features import NormParams, NormStats

from conftest import EPS32, bam_score_atol, undecided_keep

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
    beta, ema, dc = 0.99 ** 16, np.zeros((H, C, 17)), 0.0
    for t in range(3):
        spec = np.abs(np.fft.rfft(series[..., 16 * t:16 * t + 32] * win, axis=-1))
        m = (t >= np.arange(C) // 16)[None, :, None]
        ema = beta * ema + (1 - beta) * m * spec
        dc = max(dc, spec.max())
    # float32 DFT of n_fft = 32 terms (rows >= 0: the DC bin bounds every bin's sum of |terms|), EMA weights < 1
    np.testing.assert_allclose(s2.ema, ema, rtol=0, atol=32 * EPS32 * dc)
    np.testing.assert_array_equal(s2.left_context, series[..., -16:])       # carried context: a copy
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
    newest = np.asarray(policy.slot_info(s1, POS, VALID2)[3])
    # each key's DFT sums |terms| of at most its series' column sum (left context + new rows); plus the old EMA
    dft_scale = float((np.asarray(s1.left_context).sum(-1) + ROWS2.sum(1)).max() + np.abs(np.asarray(s1.ema)).max())
    near_tie = np.zeros((32, H, C), bool)
    for i in range(32):
        s, sc, k = step(pop[i], s1, jnp.asarray(ROWS2), POS, VALID2)
        # The vmapped program batches the scorer's matmuls and fuses them differently: the same float32
        # sums in another order (measured up to ~23 eps * max|score|, ~75 under fast math), so the scores
        # agree to the BAM chain's summation bound, C keys attended.
        tol = bam_score_atol(sc, C)
        np.testing.assert_allclose(vscores[i], sc, rtol=0, atol=tol)
        # Keep decisions are exact except where a score within tol of the threshold or of the K-th best
        # score could flip them (the same scores, reordered sums: both sides lie in that box).
        near_tie[i] = undecided_keep(sc, VALID2, newest, tol, CFG.selection)
        decided = ~near_tie[i]
        np.testing.assert_array_equal(np.asarray(vkeep[i])[decided], np.asarray(k)[decided])
        # The EMA does not depend on the batched parameters (vmap leaves it unbatched): equal on every
        # slot both keep, up to a reordered 32-point DFT (n_fft terms) in the other program's fusion.
        both = np.asarray(vkeep[i]) & np.asarray(k)
        np.testing.assert_allclose(np.asarray(vs.ema[i])[both], np.asarray(s.ema)[both], rtol=0,
                                   atol=CFG.features.n_fft * EPS32 * dft_scale)
    assert near_tie.sum() <= 0.01 * near_tie.size        # the exact comparison covers >= 99% of the decisions
    assert len({int(k) for k in np.asarray(vkeep).sum((1, 2))}) > 1  # members really differ


def test_bad_inputs_fail_early():
    s0 = policy.init_state(H, C, CFG)
    with pytest.raises(ValueError, match="multiple of hop"):
        policy.update(scoring.zeros(CFG), None, s0, jnp.zeros((H, 8, C)), POS, VALID1, CFG)
    with pytest.raises(ValueError, match="GQA-average"):
        policy.update(scoring.zeros(CFG), None, s0, jnp.zeros((6, 16, C)), POS, VALID1, CFG)
