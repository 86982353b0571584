"""NAMM token features in PyTorch, mirroring ``namm.features`` (reference sections 2.1-2.5).

Shapes: H = KV heads, n = new queries since the last update, N = cached tokens, T = n / hop frames,
S = spectrogram bins (n_fft//2 + 1 = 17), F = age_dim + S = 25. Leading batch axes are allowed.
All maths in float32.
"""

from __future__ import annotations

import torch

from namm.config import FeatureConfig, NAMMConfig


def _fcfg(cfg) -> FeatureConfig:
    return cfg.features if isinstance(cfg, NAMMConfig) else cfg


def gqa_average(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[..., Hq, n, N] -> [..., Hkv, n, N]``: mean over each GQA group (query head h -> KV head h // G)."""
    hq = attn.shape[-3]
    if hq % num_kv_heads:
        raise ValueError(f"gqa_average: {hq} query heads are not a multiple of num_kv_heads={num_kv_heads}")
    g = hq // num_kv_heads
    return attn.float().reshape(*attn.shape[:-3], num_kv_heads, g, *attn.shape[-2:]).mean(dim=-3)


def window(cfg, device=None) -> torch.Tensor:
    """``[n_fft]`` analysis window; periodic Hann = ``torch.hann_window(n_fft, periodic=True)``."""
    c = _fcfg(cfg)
    if c.window == "hann_periodic":
        return torch.hann_window(c.n_fft, periodic=True, dtype=torch.float64, device=device).float()
    if c.window == "hann_symmetric":
        return torch.hann_window(c.n_fft, periodic=False, dtype=torch.float64, device=device).float()
    return torch.ones(c.n_fft, device=device)


def _spectrogram(series: torch.Tensor, c: FeatureConfig) -> torch.Tensor:
    """``[..., N, L] -> [..., N, T, S]``: explicit framing, window, rfft, magnitudes (or [Re | Im])."""
    length = series.shape[-1]
    if length < c.n_fft or (length - c.n_fft) % c.hop:
        raise ValueError(
            f"STFT: series length {length} must be n_fft + k*hop (n_fft={c.n_fft}, hop={c.hop}); "
            "n_new must be a multiple of hop"
        )
    frames = series.float().unfold(-1, c.n_fft, c.hop)  # [..., N, T, n_fft]: frame t = series[t*hop : t*hop+n_fft]
    z = torch.fft.rfft(frames * window(c, series.device), dim=-1)  # [..., N, T, bins] complex
    if c.output == "real_imag":
        return torch.cat([z.real, z.imag], dim=-1)
    zr = torch.view_as_real(z)
    return torch.sqrt(zr[..., 0] * zr[..., 0] + zr[..., 1] * zr[..., 1])  # |X|


def stft_magnitudes(series: torch.Tensor, cfg) -> torch.Tensor:
    """series ``[..., N, n_new + n_fft - hop]`` (left context first) -> ``[..., T, N, S]`` (T = n_new / hop)."""
    return _spectrogram(series, _fcfg(cfg)).movedim(-2, -3)


def ema_weights(num_frames: int, cfg, device=None) -> torch.Tensor:
    """``[T]``: (1 - beta) beta^(T-1-t), beta = gamma^hop."""
    c = _fcfg(cfg)
    beta = float(c.ema_coeff) ** c.hop
    t = torch.arange(num_frames, dtype=torch.float64, device=device)
    return ((1.0 - beta) * beta ** (num_frames - 1 - t)).float()


def frame_mask(is_new: torch.Tensor, new_index: torch.Tensor, num_frames: int, cfg) -> torch.Tensor:
    """``[..., N, T]``: 1 for old keys; for a new key j (index in the new block), 1 iff j // hop <= t."""
    c = _fcfg(cfg)
    t = torch.arange(num_frames, device=is_new.device)
    block = torch.div(new_index, c.hop, rounding_mode="floor")[..., None]
    return torch.where(is_new[..., None], t >= block, torch.ones_like(t, dtype=torch.bool))


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """x <- (x - mean) / max(sqrt(var), eps), per feature."""
    return (x - mean) / torch.clamp(torch.sqrt(var), min=eps)


def age_frequencies(cfg, device=None) -> torch.Tensor:
    """``[age_dim/2]``: f_i = max_freq^(-i / (age_dim/2))."""
    c = _fcfg(cfg)
    half = c.age_dim // 2
    i = torch.arange(half, dtype=torch.float64, device=device)
    return (float(c.age_max_freq) ** (-i / half)).float()


_TABLES: dict = {}


def age_table(cfg, device=None) -> torch.Tensor:
    """``[max_age + 1, age_dim]`` lookup table of the age embedding, computed in float64 (as the reference's table)."""
    c = _fcfg(cfg)
    key = (c.age_dim, c.age_max_freq, c.max_age, str(device))
    if key not in _TABLES:
        half = c.age_dim // 2
        f = float(c.age_max_freq) ** (-torch.arange(half, dtype=torch.float64) / half)
        arg = torch.arange(c.max_age + 1, dtype=torch.float64)[:, None] * f
        _TABLES[key] = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).float().to(device)
    return _TABLES[key]


def age_embedding(recency: torch.Tensor, cfg) -> torch.Tensor:
    """``[...] -> [..., age_dim]``: [sin(r f_i), cos(r f_i)], f_i = max_freq^(-i/(d/2)), r = clip(recency, 0, max_age).

    Read from a float64-built table, so large ages keep full float32 accuracy; newest token r = 0.
    """
    c = _fcfg(cfg)
    r = torch.clamp(recency.long(), 0, c.max_age)
    return age_table(c, recency.device)[r]


def _windowed_basis(c: FeatureConfig, num_frames: int, device) -> torch.Tensor:
    """``[T, 2S, n_fft]``: frame t's analysis matrix ``w_t [win*cos | -win*sin]^T``, w_t >= 0 the EMA weight."""
    key = ("basis", c.n_fft, c.hop, c.window, c.ema_coeff, num_frames, str(device))
    if key not in _TABLES:
        bins = c.n_fft // 2 + 1
        w = torch.arange(c.n_fft, dtype=torch.float64)[:, None]
        f = torch.arange(bins, dtype=torch.float64)[None, :]
        ang = 2 * torch.pi * torch.remainder(w * f, c.n_fft) / c.n_fft
        win = window(c).double()[:, None]
        basis = torch.cat([win * torch.cos(ang), -win * torch.sin(ang)], 1).T  # [2S, n_fft]
        weights = ema_weights(num_frames, c).double()
        _TABLES[key] = (weights[:, None, None] * basis[None]).float().to(device)
    return _TABLES[key]


def _ema_spectrum(ctx_q: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, first_new: int,
                  c: FeatureConfig) -> torch.Tensor:
    """The EMA-weighted spectrogram sum of one head, query-major: -> ``[N, S]``.

    ctx_q ``[n_fft - hop, N]`` (left context, oldest first) and rows ``[n, N]`` (the new queries'
    attention) hold each key's series down a column; mask ``[T, N]`` (float) is ``frame_mask``, all
    ones before column ``first_new``. Returns ``sum_t m_tk w_t |X_t|_k`` (or ``[Re | Im]`` for
    ``output == "real_imag"``), w the EMA weights.

    Because w_t >= 0, ``w_t |X_t| = |w_t X_t|``: the weight is folded into frame t's DFT basis, so the
    frames are transformed by batched matmuls straight from the attention rows (no transpose, no
    framing or concatenation copy): with n_fft = r * hop, frame t is hop-row blocks t .. t+r-1 of
    [context; rows], each multiplied by its slice of the basis and accumulated.
    """
    n, n_keys = rows.shape
    T, hop = n // c.hop, c.hop
    basis = _windowed_basis(c, T, rows.device)  # [T, 2S, n_fft]
    if c.n_fft % hop == 0:
        n_ctx = c.n_fft // hop - 1  # context blocks
        ctx_blocks = ctx_q.reshape(n_ctx, hop, n_keys)
        row_blocks = rows.reshape(T, hop, n_keys)
        # the last block of every frame is a row block: that product starts the sum
        z = torch.bmm(basis[:, :, n_ctx * hop :], row_blocks)  # [T, 2S, N]
        for j in range(n_ctx):
            part = basis[:, :, j * hop : (j + 1) * hop]
            split = min(n_ctx - j, T)  # frames [0, split) read context blocks j.., the rest row blocks 0..
            for lo, hi, src in ((0, split, ctx_blocks[j : j + split]), (split, T, row_blocks[: T - split])):
                if hi > lo:
                    z[lo:hi].baddbmm_(part[lo:hi], src)
    else:
        series = torch.cat([ctx_q, rows], dim=0)  # [L, N]
        frames = series.as_strided((T, c.n_fft, n_keys), (hop * n_keys, n_keys, 1))
        z = torch.bmm(basis, frames)  # [T, 2S, N]
    if c.output == "real_imag":
        spec = z
    else:
        bins = c.n_fft // 2 + 1
        spec = torch.hypot(z[:, :bins], z[:, bins:])  # [T, S, N] = w_t |X_t|
    if first_new < n_keys:  # only new keys have frames masked out
        spec[..., first_new:].mul_(mask[:, None, first_new:])
    return spec.sum(0).T  # [N, S]


def token_features(rows, left_context, ema_old, is_new, recency, norm, cfg):
    """One update's features, as ``namm.features.token_features``.

    rows ``[..., H, n, N]`` (GQA-averaged), left_context ``[..., H, N, n_fft - hop]`` (ignored for new
    keys), ema_old ``[..., H, N, S]``, is_new ``[..., H, N]`` bool, recency ``[..., H, N]`` (newest 0;
    a new key's index in the block is j = n - 1 - recency), norm ``(mean [S], var [S])`` or None.
    Returns (features ``[..., H, N, F]`` = [age | normalised EMA], raw ema ``[..., H, N, S]``,
    next left context ``[..., H, N, n_fft - hop]``).

    Computed query-major (``_ema_spectrum``): the same numbers as framing each key's series and
    reducing its spectrogram over frames (``namm.features.stft_magnitudes`` + ``ema_reduce``, the
    reference it is tested against), at a fraction of the memory traffic.
    """
    c = _fcfg(cfg)
    n, n_keys = rows.shape[-2], rows.shape[-1]
    if n % c.hop:
        raise ValueError(f"token_features: {n} new queries is not a multiple of hop={c.hop}")
    rows = rows.float()
    ctx = torch.where(is_new[..., None], torch.zeros_like(left_context, dtype=torch.float32), left_context.float())
    ctx_q = ctx.transpose(-1, -2)  # [..., H, n_fft - hop, N]
    decay_old = torch.where(is_new[..., None], torch.zeros_like(ema_old, dtype=torch.float32), ema_old.float())
    if n == 0:  # an update with fewer than hop new queries (end of an odd-length prefill): no new frame,
        # so the EMA stands as it is and new keys, not yet seen by any frame, count zero
        ema = decay_old
    else:
        T = n // c.hop
        mask = frame_mask(is_new, n - 1 - recency, T, c).float().transpose(-1, -2)  # [..., H, T, N]
        flat_new = is_new.reshape(-1, n_keys)
        first_new = torch.where(flat_new.any(-1), flat_new.int().argmax(-1), n_keys).tolist()
        flat_c, flat_r = ctx_q.reshape(len(first_new), c.context, n_keys), rows.reshape(-1, n, n_keys)
        flat_m = mask.reshape(-1, T, n_keys)
        fresh = torch.stack([_ema_spectrum(flat_c[i], flat_r[i], flat_m[i], first_new[i], c)
                             for i in range(len(first_new))])
        ema = float(c.ema_coeff) ** n * decay_old + fresh.reshape(decay_old.shape)  # gamma^n E_old [old] + fresh
    x = ema if norm is None else normalize(ema, norm[0], norm[1], c.norm_eps)
    feats = torch.cat([age_embedding(recency, c), x], dim=-1)
    tail = rows if n >= c.context else torch.cat([ctx_q, rows], dim=-2)  # the series' last n_fft - hop rows
    # a copy, not a view: a view would keep the whole [..., n, N] attention rows alive until the next update
    next_ctx = tail[..., tail.shape[-2] - c.context :, :].transpose(-1, -2).contiguous()
    return feats, ema, next_ctx


class NormStats:
    """Running per-bin mean/variance (Chan et al. parallel merge), in float64, masked by validity."""

    def __init__(self, dim: int):
        self.count = 0.0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> "NormStats":
        """Merge rows of ``x [..., S]`` where ``mask [...]`` is True."""
        x = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.detach().to("cpu").reshape(-1)]
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)  # Chan: mean_a + d n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)  # + d^2 n_a n_b / n
        self.count = n
        return self

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population (mean [S], var [S]) in float32."""
        var = self.m2 / max(self.count, 1.0)
        return self.mean.float(), var.float()


def num_frames(series_len: int, cfg) -> int:
    c = _fcfg(cfg)
    return (series_len - c.n_fft) // c.hop + 1


def neighbour_max(x: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, kernel: int) -> torch.Tensor:
    """As ``namm.features.neighbour_max``: ``x [..., N, D]`` max-pooled over the ``kernel`` chronologically nearest
    valid slots (order ``[..., N]`` positions, valid ``[..., N]``); invalid slots get 0."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(valid, order.long(), torch.full_like(order, big, dtype=torch.long))
    perm = key.argsort(dim=-1, stable=True)
    xs = torch.gather(x.float(), -2, perm[..., None].expand(x.shape))
    vs = torch.gather(valid, -1, perm)
    xs = xs.masked_fill(~vs[..., None], float("-inf"))
    lead, n, d = xs.shape[:-2], xs.shape[-2], xs.shape[-1]
    flat = xs.reshape(-1, n, d).transpose(1, 2)                                 # [B', D, N]
    pooled = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    pooled = pooled.transpose(1, 2).reshape(*lead, n, d)
    out = torch.empty_like(pooled).scatter_(-2, perm[..., None].expand(pooled.shape), pooled)
    return out.masked_fill(~valid[..., None], 0.0)


def with_pooled(feats: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, cfg) -> torch.Tensor:
    """As ``namm.features.with_pooled``: the pooled spectrogram part appended when ``pool_kernel`` is set."""
    c = _fcfg(cfg)
    if not c.pool_kernel:
        return feats
    order = order.expand(valid.shape)
    return torch.cat([feats, neighbour_max(feats[..., c.age_dim:], order, valid, c.pool_kernel)], dim=-1)


__all__ = [
    "NormStats",
    "age_embedding",
    "age_frequencies",
    "ema_weights",
    "frame_mask",
    "gqa_average",
    "neighbour_max",
    "normalize",
    "num_frames",
    "stft_magnitudes",
    "token_features",
    "window",
    "with_pooled",
]
