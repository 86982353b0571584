"""snapkv: attention of the last ``window`` queries summed, max-pooled over ``kernel`` neighbouring tokens
(chronological order); the window's own tokens are protected."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from namm.baselines.base import _make, register
from namm.policy import Policy


@register("snapkv")
def snapkv(budget: int | float, window: int = 32, kernel: int = 5) -> Policy:
    """SnapKV: votes of the last ``window`` queries, max-pooled over ``kernel`` neighbours; window tokens protected."""
    if window < 1 or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"snapkv: window={window} must be >= 1 and kernel={kernel} a positive odd number")

    def score(ctx):
        rows, pos, valid = ctx["rows"], ctx["pos"], ctx["valid"]
        votes = rows[:, -window:, :].sum(axis=-2)                                    # [H, C]
        votes = jnp.where(valid, votes, -jnp.inf)
        order = jnp.argsort(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
        chrono = jnp.take_along_axis(votes, order, axis=-1)                         # chronological order
        pooled = jax.lax.reduce_window(chrono, -jnp.inf, jax.lax.max, (1, kernel), (1, 1), "SAME")
        s = jnp.put_along_axis(jnp.zeros_like(pooled), order, pooled, axis=-1, inplace=False)
        protected = valid & (ctx["recency"] < min(window, rows.shape[-2]))           # the observation window
        return s, protected

    return _make(score, budget=budget)
