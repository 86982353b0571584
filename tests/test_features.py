"""Golden tests for the NAMM feature pipeline, against NumPy/SciPy written from the reference maths."""

import numpy as np
import pytest
import scipy.signal

import jax.numpy as jnp

from namm import features as F
from namm.config import FeatureConfig, NAMMConfig

from conftest import EPS32

CFG = FeatureConfig()
RNG = np.random.default_rng(0)


def np_stft(series, n_fft=32, hop=16):
    """[..., N, L] -> [..., T, N, 17] |rfft(periodic_hann * frame)| for un-centred frames."""
    win = scipy.signal.get_window("hann", n_fft, fftbins=True)
    T = (series.shape[-1] - n_fft) // hop + 1
    frames = np.stack([series[..., t * hop:t * hop + n_fft] for t in range(T)], axis=-3)  # [..., T, N, n_fft]
    return np.abs(np.fft.rfft(frames * win, axis=-1))


def test_gqa_average_groups_consecutive_query_heads():
    attn = RNG.random((9, 4, 6)).astype(np.float32)                        # [Hq, n, N]
    out = np.asarray(F.gqa_average(jnp.asarray(attn), 3))
    want = np.stack([attn[3 * h:3 * h + 3].mean(0) for h in range(3)])    # q head h -> kv head h // 3
    assert out.shape == (3, 4, 6)
    np.testing.assert_allclose(out, want, rtol=4 * EPS32)                  # a 3-term float32 mean in another order
    with pytest.raises(ValueError, match="multiple"):
        F.gqa_average(jnp.asarray(attn), 4)


def test_window_is_periodic_hann():
    # float32 rounding of values in [0, 1] (symmetric Hann differs by >= 3e-3)
    np.testing.assert_allclose(F.window(CFG), scipy.signal.get_window("hann", 32, fftbins=True), atol=EPS32, rtol=0)
    assert F.window(CFG)[16] == pytest.approx(1.0, abs=EPS32)               # periodic: peak at n/2, w[0] = 0


def test_stft_matches_numpy_rfft_and_frame_count():
    n_new = 64
    series = RNG.random((2, 5, n_new + 16)).astype(np.float32)             # [H, N, 16 + n_new]
    out = np.asarray(F.stft_magnitudes(jnp.asarray(series), CFG))
    assert out.shape == (2, n_new // 16, 5, 17)                            # T = n_new / hop frames, 17 bins
    # float32 vs float64 DFT: n_fft terms per bin; the series is >= 0, so each frame's DC bin (the largest
    # output) is the sum of |terms| of every bin of that frame
    want = np_stft(series)
    np.testing.assert_allclose(out, want, rtol=0, atol=32 * EPS32 * want.max())


def test_stft_general_framing_path_matches_numpy():
    cfg = FeatureConfig(n_fft=16, hop=4, update_interval=128, chunk_size=128)
    series = RNG.random((3, 12 + 32)).astype(np.float32)
    out = np.asarray(F.stft_magnitudes(jnp.asarray(series), cfg))
    assert out.shape == (8, 3, 9)
    want = np_stft(series, 16, 4)
    np.testing.assert_allclose(out, want, rtol=0, atol=16 * EPS32 * want.max())  # n_fft = 16 terms, as above


def test_stft_frame_alignment_with_left_context():
    # Frame t covers new-query indices [16t - 16, 16t + 16): an impulse at new query q lands in
    # frames floor(q/16) - 1 and floor(q/16) only; one in the left context lands in frame 0 only.
    n_new = 96
    for q in (0, 15, 16, 40, 95):
        s = np.zeros((1, n_new + 16), np.float32)
        s[0, 16 + q] = 1.0
        mag = np.asarray(F.stft_magnitudes(jnp.asarray(s), CFG))[:, 0, 0]   # DC bin per frame [T]
        hit = set(np.nonzero(mag > 0)[0])
        win = scipy.signal.get_window("hann", 32, fftbins=True)
        want = {t for t in range(n_new // 16) if 16 * t - 16 <= q < 16 * t + 16 and win[q - 16 * t + 16] > 0}
        assert hit == want, (q, hit, want)
    s = np.zeros((1, n_new + 16), np.float32)
    s[0, 5] = 1.0
    mag = np.asarray(F.stft_magnitudes(jnp.asarray(s), CFG))[:, 0, 0]
    assert list(np.nonzero(mag > 0)[0]) == [0]


def test_stft_rejects_bad_length():
    with pytest.raises(ValueError, match="multiple of hop"):
        F.stft_magnitudes(jnp.zeros((2, 16 + 20)), CFG)


def test_ema_recursion_with_new_token_mask():
    T, N, S, hop = 4, 6, 17, 16
    spec = RNG.random((T, N, S)).astype(np.float32)
    old = RNG.random((N, S)).astype(np.float32)
    is_new = np.array([False, False, True, True, True, True])
    new_index = np.array([0, 0, 0, 17, 40, 63])                           # blocks 0, 1, 2, 3
    out = np.asarray(F.ema_reduce(jnp.asarray(spec), jnp.asarray(old), jnp.asarray(is_new),
                                  jnp.asarray(new_index), CFG))
    beta = 0.99 ** hop
    want = np.where(is_new[:, None], 0.0, old)
    for t in range(T):                                                    # E <- beta E + (1 - beta) m_t S_t
        m = np.where(is_new, t >= new_index // hop, True)[:, None]
        want = beta * want + (1 - beta) * m * spec[t]
    # nonnegative terms: T frame products + the decayed old EMA, float32 weights (one rounding each)
    np.testing.assert_allclose(out, want, rtol=(T + 2) * EPS32)
    # The carried EMA decays by gamma^n_new = 0.99^64 for old tokens.
    zero_spec = np.asarray(F.ema_reduce(jnp.zeros_like(spec), jnp.asarray(old), jnp.asarray(is_new),
                                        jnp.asarray(new_index), CFG))
    np.testing.assert_allclose(zero_spec[:2], 0.99 ** 64 * old[:2], rtol=EPS32)  # gamma^64 rounded to float32, one product


def test_age_embedding_sin_then_cos_newest_zero():
    r = np.array([0, 1, 7, 100, 5000, 40000])
    out = np.asarray(F.age_embedding(jnp.asarray(r), CFG))
    f = 50000.0 ** (-np.arange(4) / 4)
    rc = np.minimum(r, 32768)[:, None]
    want = np.concatenate([np.sin(rc * f), np.cos(rc * f)], axis=-1)
    np.testing.assert_allclose(out, want, atol=EPS32 / 2, rtol=0)                 # a float64 table rounded once to float32
    np.testing.assert_array_equal(out[0], [0, 0, 0, 0, 1, 1, 1, 1])
    # the reference's periods as printed, to 4 significant digits
    np.testing.assert_allclose(2 * np.pi / f, [6.283, 93.97, 1405.0, 21010.0], rtol=5e-4)


def test_normalize_and_chan_statistics():
    blocks = [RNG.normal(3.0, 2.0, (2, 3, 7, 17)).astype(np.float32) for _ in range(3)]
    masks = [RNG.random((2, 3, 7)) > 0.3 for _ in range(3)]
    stats = F.NormStats.init(17)
    for x, m in zip(blocks, masks):
        stats = stats.update(jnp.asarray(x), jnp.asarray(m))
    pooled = np.concatenate([x[m] for x, m in zip(blocks, masks)])          # [tokens, 17]
    mean, var = stats.finalize()
    assert float(stats.count) == len(pooled)
    # float32 sums of n terms in two orders (Chan merges vs NumPy's pairwise sum): the mean to n eps mean|x|,
    # the variance to n eps mean(x^2) (what the sum of squares cancels against)
    n = len(pooled)
    mean_tol, var_tol = n * EPS32 * np.abs(pooled).mean(0).max(), n * EPS32 * (pooled.astype(np.float64) ** 2).mean(0).max()
    np.testing.assert_allclose(mean, pooled.mean(0), rtol=0, atol=mean_tol)
    np.testing.assert_allclose(var, pooled.var(0), rtol=0, atol=var_tol)
    # merging two accumulators equals one pass
    a = F.NormStats.init(17).update(jnp.asarray(blocks[0]), jnp.asarray(masks[0]))
    b = F.NormStats.init(17).update(jnp.asarray(blocks[1]), jnp.asarray(masks[1])).update(
        jnp.asarray(blocks[2]), jnp.asarray(masks[2]))
    np.testing.assert_allclose(a.merge(b).finalize().var, pooled.var(0), rtol=0, atol=var_tol)
    # an empty block is a no-op
    same = stats.update(jnp.asarray(blocks[0]), jnp.zeros((2, 3, 7), bool))
    np.testing.assert_array_equal(same.finalize().mean, mean)                # merging a zero count changes nothing
    x = pooled[:4]
    z = np.asarray(F.normalize(jnp.asarray(x), mean, var, 1e-7))
    # the statistics' errors above carried through (x - mean) / sigma: mean_tol / sigma + |z| var_tol / (2 var)
    want = (x - pooled.mean(0)) / np.sqrt(pooled.var(0))
    sd = np.sqrt(pooled.var(0))
    np.testing.assert_allclose(z, want, rtol=4 * EPS32, atol=mean_tol / sd.min() + np.abs(want).max() * var_tol / (2 * sd.min() ** 2))
    # 1 / float32(1e-7): one rounding of the eps and one of the quotient
    np.testing.assert_allclose(F.normalize(jnp.ones(3), jnp.zeros(3), jnp.zeros(3), 1e-7), 1e7, rtol=2 * EPS32)


def test_token_features_composition():
    cfg = NAMMConfig()
    H, n, N = 2, 32, 40
    rows = RNG.random((H, n, N)).astype(np.float32)
    ctx = RNG.random((H, N, 16)).astype(np.float32)
    old = RNG.random((H, N, 17)).astype(np.float32)
    is_new = np.zeros((H, N), bool)
    is_new[:, -n:] = True
    recency = np.broadcast_to(np.arange(N)[::-1], (H, N)).copy()           # slot N-1 is the newest
    mean, var = RNG.random(17).astype(np.float32), RNG.random(17).astype(np.float32) + 0.5
    feats, ema, nxt = F.token_features(jnp.asarray(rows), jnp.asarray(ctx), jnp.asarray(old),
                                       jnp.asarray(is_new), jnp.asarray(recency), F.NormParams(mean, var), cfg)
    assert feats.shape == (H, N, 25) and ema.shape == (H, N, 17) and nxt.shape == (H, N, 16)
    series = np.concatenate([np.where(is_new[..., None], 0.0, ctx), rows.transpose(0, 2, 1)], -1)
    spec = np_stft(series)                                                 # [H, T, N, 17]
    beta, want = 0.99 ** 16, np.where(is_new[..., None], 0.0, old)
    j = n - 1 - recency
    for t in range(n // 16):
        m = np.where(is_new, t >= j // 16, True)[..., None]
        want = beta * want + (1 - beta) * m * spec[:, t]
    # float32 DFT of n_fft terms (series >= 0: the DC bin bounds the sum of |terms|), EMA weights summing to < 1,
    # plus the old EMA's decay product
    ema_tol = 32 * EPS32 * spec.max() + 2 * EPS32 * old.max()
    np.testing.assert_allclose(ema, want, rtol=0, atol=ema_tol)
    feat = (want - mean) / np.sqrt(var)
    np.testing.assert_allclose(feats[..., 8:], feat, rtol=0,
                               atol=ema_tol / np.sqrt(var).min() + 4 * EPS32 * np.abs(feat).max())
    np.testing.assert_array_equal(feats[..., :8], F.age_embedding(jnp.asarray(recency), cfg))  # the same lookup
    np.testing.assert_array_equal(nxt, series[..., -16:])                    # carried left context: a copy
