"""recency: the ``budget`` most recent tokens (sliding window)."""

from __future__ import annotations

import jax.numpy as jnp

from namm.baselines.base import _make, register
from namm.policy import Policy


@register("recency")
def recency(budget: int | float) -> Policy:
    """Sliding window: the ``budget`` most recent tokens."""
    return _make(lambda ctx: (ctx["pos"].astype(jnp.float32), None), budget=budget)
