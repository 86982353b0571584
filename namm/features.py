"""NAMM token features: attention -> spectrogram -> EMA -> normalisation, plus the age embedding.

Pure JAX functions (reference sections 2.1-2.5). Shapes use H = KV heads, n = new queries since
the last update (n_new), N = cached key tokens (slots), T = n_new / hop STFT frames, S = spectrogram
bins (n_fft//2 + 1 = 17 for magnitudes), F = feature_dim = age_dim + S = 25.

The STFT is computed as a matmul against a precomputed windowed real DFT basis: frame t of a key's
series x is ``X_t[f] = sum_w win[w] x[t*hop + w] exp(-2 pi i f w / n_fft)``, identical to
``torch.stft(center=False, onesided=True, normalized=False)`` and to ``rfft(win * frame)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from namm.config import FeatureConfig, NAMMConfig

Array = jax.Array


def _fcfg(cfg) -> FeatureConfig:
    return cfg.features if isinstance(cfg, NAMMConfig) else cfg


# --------------------------------------------------------------------------------------------
# 2.1 GQA reduction
# --------------------------------------------------------------------------------------------

def gqa_average(attn: Array, num_kv_heads: int) -> Array:
    """Average attention over each GQA group: ``[..., Hq, n, N] -> [..., Hkv, n, N]``.

    Query head q belongs to KV head q // (Hq / Hkv), as in HF ``repeat_kv``.
    """
    hq = attn.shape[-3]
    if hq % num_kv_heads:
        raise ValueError(f"gqa_average: {hq} query heads are not a multiple of num_kv_heads={num_kv_heads}")
    g = hq // num_kv_heads
    attn = attn.reshape(attn.shape[:-3] + (num_kv_heads, g) + attn.shape[-2:])
    return attn.astype(jnp.float32).mean(axis=-3)


# --------------------------------------------------------------------------------------------
# 2.2 STFT
# --------------------------------------------------------------------------------------------

def window(cfg) -> np.ndarray:
    """The analysis window ``[n_fft]`` (float32). Periodic Hann: 0.5 - 0.5 cos(2 pi w / n_fft)."""
    c = _fcfg(cfg)
    w = np.arange(c.n_fft, dtype=np.float64)
    if c.window == "hann_periodic":
        win = 0.5 - 0.5 * np.cos(2 * np.pi * w / c.n_fft)
    elif c.window == "hann_symmetric":
        win = 0.5 - 0.5 * np.cos(2 * np.pi * w / (c.n_fft - 1))
    else:
        win = np.ones(c.n_fft)
    return win.astype(np.float32)


def dft_basis(cfg) -> np.ndarray:
    """Windowed one-sided real DFT basis ``[n_fft, 2 * bins]``: columns [win*cos | -win*sin]."""
    c = _fcfg(cfg)
    bins = c.n_fft // 2 + 1
    w = np.arange(c.n_fft)[:, None]
    f = np.arange(bins)[None, :]
    ang = 2 * np.pi * ((w * f) % c.n_fft) / c.n_fft
    win = window(c).astype(np.float64)[:, None]
    return np.concatenate([win * np.cos(ang), -win * np.sin(ang)], axis=1).astype(np.float32)


def num_frames(series_len: int, cfg) -> int:
    """Frames of an un-centred STFT: (L - n_fft) // hop + 1 (= n_new / hop with the left context)."""
    c = _fcfg(cfg)
    return (series_len - c.n_fft) // c.hop + 1


def _frames(series: Array, cfg: FeatureConfig) -> Array:
    """``[..., L] -> [..., T, n_fft]``: frame t is series[t*hop : t*hop + n_fft]."""
    T = num_frames(series.shape[-1], cfg)
    if cfg.n_fft == 2 * cfg.hop and series.shape[-1] == (T + 1) * cfg.hop:
        # Fast path (the paper's 32/16): two shifted views of the hop-sized blocks.
        blocks = series.reshape(series.shape[:-1] + (T + 1, cfg.hop))
        return jnp.concatenate([blocks[..., :-1, :], blocks[..., 1:, :]], axis=-1)
    idx = np.arange(T)[:, None] * cfg.hop + np.arange(cfg.n_fft)[None, :]
    return series[..., idx]


def _spectrogram(series: Array, cfg: FeatureConfig) -> Array:
    """``[..., N, L] -> [..., N, T, S]``: STFT magnitudes (or real|imag) per key token."""
    c = cfg
    if series.shape[-1] < c.n_fft or (series.shape[-1] - c.n_fft) % c.hop:
        raise ValueError(f"STFT: series length {series.shape[-1]} must be n_fft + k*hop "
                         f"(n_fft={c.n_fft}, hop={c.hop}); n_new must be a multiple of hop")
    series = series.astype(jnp.float32)
    basis = jnp.asarray(dft_basis(c))                                     # [n_fft, 2*bins]
    frames = _frames(series, c)                                           # [..., N, T, n_fft]
    z = jnp.einsum("...tw,wf->...tf", frames, basis, precision=jax.lax.Precision.HIGHEST)  # [..., N, T, 2*bins]
    if c.output == "real_imag":
        return z
    bins = c.n_fft // 2 + 1
    re, im = z[..., :bins], z[..., bins:]
    return jnp.sqrt(re * re + im * im)                                    # |STFT|, [..., N, T, bins]


def stft_magnitudes(series: Array, cfg) -> Array:
    """Spectrogram of each key's attention series.

    series: ``[..., N, n_new + n_fft - hop]`` (left context first, then the new queries' attention)
    returns ``[..., T, N, S]`` with T = n_new / hop; frame t covers series[t*hop : t*hop + n_fft],
    i.e. new-query indices [hop*t - (n_fft-hop), hop*t + hop). Periodic Hann, no centring, one-sided,
    unnormalised; magnitudes |X| (17 bins) or [Re | Im] if ``output == "real_imag"``.
    """
    return jnp.moveaxis(_spectrogram(series, _fcfg(cfg)), -2, -3)


# --------------------------------------------------------------------------------------------
# 2.3 EMA over frames
# --------------------------------------------------------------------------------------------

def ema_weights(num_frames_: int, cfg) -> np.ndarray:
    """``[T]`` weights (1 - beta) * beta^(T-1-t) with beta = gamma^hop."""
    c = _fcfg(cfg)
    beta = float(c.ema_coeff) ** c.hop
    t = np.arange(num_frames_)
    return ((1.0 - beta) * beta ** (num_frames_ - 1 - t)).astype(np.float32)


def frame_mask(is_new: Array, new_index: Array, num_frames_: int, cfg) -> Array:
    """``m [..., N, T]``: 1 for old keys; for a new key j, 1 iff its block j // hop <= t."""
    c = _fcfg(cfg)
    t = jnp.arange(num_frames_)
    block = (new_index // c.hop)[..., None]
    return jnp.where(is_new[..., None], t >= block, True)


def ema_reduce(spec: Array, ema_old: Array, is_new: Array, new_index: Array, cfg) -> Array:
    """Collapse the spectrogram over frames with the carried EMA (reference 2.3).

    spec ``[..., T, N, S]``, ema_old ``[..., N, S]``, is_new ``[..., N]`` bool, new_index ``[..., N]``
    (index j of a new key inside the n_new block; ignored for old keys) -> ``[..., N, S]``:

        E_k = gamma^n_new * E_old_k * [k old] + sum_t (1 - beta) beta^(T-1-t) m_tk S_tk
    """
    return _ema_from_nts(jnp.moveaxis(spec, -3, -2), ema_old, is_new, new_index, _fcfg(cfg))


def _ema_from_nts(spec_nts: Array, ema_old: Array, is_new: Array, new_index: Array,
                  cfg: FeatureConfig) -> Array:
    T = spec_nts.shape[-2]
    w = jnp.asarray(ema_weights(T, cfg))                                   # [T]
    m = frame_mask(is_new, new_index, T, cfg)                              # [..., N, T]
    decay = float(cfg.ema_coeff) ** (T * cfg.hop)                          # gamma^n_new
    fresh = jnp.einsum("...nt,...nts->...ns", m * w, spec_nts,
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.where(is_new[..., None], 0.0, decay * ema_old) + fresh


# --------------------------------------------------------------------------------------------
# 2.4 Normalisation
# --------------------------------------------------------------------------------------------

def normalize(x: Array, mean: Array, var: Array, eps: float = 1e-7) -> Array:
    """x <- (x - mean) / max(sqrt(var), eps), per feature (last axis)."""
    return (x - mean) / jnp.maximum(jnp.sqrt(var), eps)


class NormParams(NamedTuple):
    """Frozen normalisation statistics ``mean [S]``, ``var [S]`` (shipped with the policy)."""

    mean: Array
    var: Array

    @staticmethod
    def identity(dim: int) -> "NormParams":
        return NormParams(jnp.zeros((dim,), jnp.float32), jnp.ones((dim,), jnp.float32))


class NormStats(NamedTuple):
    """Running per-bin statistics (Chan et al. parallel merge), masked by validity.

    Pool over any leading axes (batch, heads, tokens, layers) by calling ``update`` with each block:
    ``stats = NormStats.init(17); stats = stats.update(ema [L, H, N, 17], valid [L, H, N])``.
    """

    count: Array  # [] float32
    mean: Array   # [S]
    m2: Array     # [S] sum of squared deviations

    @staticmethod
    def init(dim: int) -> "NormStats":
        z = jnp.zeros((dim,), jnp.float32)
        return NormStats(jnp.zeros((), jnp.float32), z, z)

    def update(self, x: Array, mask: Array | None = None) -> "NormStats":
        """Merge a block ``x [..., S]`` (rows where ``mask [...]`` is True)."""
        x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        m = (jnp.ones(x.shape[:1], jnp.float32) if mask is None
             else mask.reshape(-1).astype(jnp.float32))
        n_b = m.sum()
        safe = jnp.maximum(n_b, 1.0)
        mean_b = (x * m[:, None]).sum(0) / safe
        m2_b = (((x - mean_b) ** 2) * m[:, None]).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        frac = jnp.where(n > 0, n_b / jnp.maximum(n, 1.0), 0.0)
        mean = self.mean + delta * frac                                     # Chan: mean_a + d n_b / n
        m2 = self.m2 + m2_b + delta ** 2 * self.count * frac                # + d^2 n_a n_b / n
        return NormStats(n, mean, m2)

    def merge(self, other: "NormStats") -> "NormStats":
        """Merge two accumulators (e.g. from different workers)."""
        n = self.count + other.count
        frac = jnp.where(n > 0, other.count / jnp.maximum(n, 1.0), 0.0)
        delta = other.mean - self.mean
        return NormStats(n, self.mean + delta * frac, self.m2 + other.m2 + delta ** 2 * self.count * frac)

    def finalize(self) -> NormParams:
        """Population mean and variance (m2 / count) per bin."""
        return NormParams(self.mean, self.m2 / jnp.maximum(self.count, 1.0))


# --------------------------------------------------------------------------------------------
# 2.5 Age embedding
# --------------------------------------------------------------------------------------------

def age_frequencies(cfg) -> np.ndarray:
    """``[age_dim/2]``: f_i = max_freq^(-i / (age_dim/2))."""
    c = _fcfg(cfg)
    half = c.age_dim // 2
    return (float(c.age_max_freq) ** (-np.arange(half) / half)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def age_table(cfg: FeatureConfig) -> np.ndarray:
    """``[max_age + 1, age_dim]`` float32 lookup table computed in float64 (exact for every recency)."""
    half = cfg.age_dim // 2
    f = float(cfg.age_max_freq) ** (-np.arange(half) / half)
    arg = np.arange(cfg.max_age + 1, dtype=np.float64)[:, None] * f
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=-1).astype(np.float32)


def age_embedding(recency: Array, cfg) -> Array:
    """``[...] -> [..., age_dim]``: [sin(r f_0..), cos(r f_0..)], r = clip(recency, 0, max_age); newest r = 0.

    f_i = age_max_freq^(-i / (age_dim/2)); looked up in a float64-computed table (as the official code).
    """
    c = _fcfg(cfg)
    r = jnp.clip(jnp.asarray(recency), 0, c.max_age).astype(jnp.int32)
    return jnp.take(jnp.asarray(age_table(c)), r, axis=0)


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------

def token_features(attention_rows: Array, left_context: Array, ema_old: Array, is_new: Array,
                   recency: Array, norm: NormParams | None, cfg) -> tuple[Array, Array, Array]:
    """One update's features for one layer.

    attention_rows ``[H, n, N]`` (GQA-averaged rows of the n new queries), left_context ``[H, N, n_fft-hop]``
    (last columns of the previous update's series; ignored for new keys, which get zeros),
    ema_old ``[H, N, S]``, is_new ``[H, N]`` bool, recency ``[H, N]`` int (newest = 0; a new key's
    index in the block is j = n - 1 - recency), norm (None = no normalisation).

    Returns (features ``[H, N, F]`` = [age(8) | normalised EMA(17)], ema ``[H, N, S]`` (raw, the
    state to carry and the input of ``NormStats``), next left context ``[H, N, n_fft-hop]``).
    """
    c = _fcfg(cfg)
    n = attention_rows.shape[-2]
    if n % c.hop:
        raise ValueError(f"token_features: {n} new queries is not a multiple of hop={c.hop}")
    rows = attention_rows.astype(jnp.float32)                              # [H, n, N]
    ctx = jnp.where(is_new[..., None], 0.0, left_context.astype(jnp.float32))
    new_index = n - 1 - recency
    series = jnp.concatenate([ctx, jnp.swapaxes(rows, -1, -2)], axis=-1)  # [H, N, n + n_fft - hop]
    spec = _spectrogram(series, c)                                         # [H, N, T, S]
    ema = _ema_from_nts(spec, ema_old.astype(jnp.float32), is_new, new_index, c)  # [H, N, S]
    next_ctx = series[..., series.shape[-1] - c.context:]                  # [H, N, n_fft - hop]
    x = ema if norm is None else normalize(ema, norm.mean, norm.var, c.norm_eps)
    feats = jnp.concatenate([age_embedding(recency, c), x], axis=-1)       # [H, N, F]
    return feats, ema, next_ctx


# --------------------------------------------------------------------------------------------
# Neighbour pooling (an extension, off in the paper's configuration)
# --------------------------------------------------------------------------------------------

def neighbour_max(x: Array, order: Array, valid: Array, kernel: int) -> Array:
    """``x [..., N, D]`` max-pooled over the ``kernel`` chronologically nearest valid slots of each token.

    order ``[..., N]`` (absolute positions; valid slots distinct), valid ``[..., N]``. Slots are sorted by
    position (invalid ones last), each valid token takes the element-wise max over itself and the
    ``kernel // 2`` valid tokens on either side in that order, and the result goes back to slot order;
    invalid slots get 0. With one eviction at the end of a prefill this is SnapKV's pooling over positions.
    """
    half = kernel // 2
    key = jnp.where(valid, order, jnp.iinfo(jnp.int32).max)
    perm = jnp.argsort(key, axis=-1, stable=True)
    xs = jnp.take_along_axis(x.astype(jnp.float32), perm[..., None], axis=-2)
    vs = jnp.take_along_axis(valid, perm, axis=-1)
    xs = jnp.where(vs[..., None], xs, -jnp.inf)
    pad = [(0, 0)] * (xs.ndim - 2) + [(half, half), (0, 0)]
    padded = jnp.pad(xs, pad, constant_values=-jnp.inf)
    n = xs.shape[-2]
    pooled = functools.reduce(jnp.maximum, [padded[..., i:i + n, :] for i in range(kernel)])
    out = jnp.take_along_axis(pooled, jnp.argsort(perm, axis=-1)[..., None], axis=-2)
    return jnp.where(valid[..., None], out, 0.0)


def with_pooled(feats: Array, order: Array, valid: Array, cfg) -> Array:
    """``[..., N, age + S] -> [..., N, age + 2S]``: the spectrogram part max-pooled (``neighbour_max``) appended;
    ``feats`` unchanged when ``pool_kernel`` is 0."""
    c = _fcfg(cfg)
    if not c.pool_kernel:
        return feats
    order = jnp.broadcast_to(order, valid.shape)
    return jnp.concatenate([feats, neighbour_max(feats[..., c.age_dim:], order, valid, c.pool_kernel)], axis=-1)
