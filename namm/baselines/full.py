"""full: keep every valid token (the full cache)."""

from __future__ import annotations

import jax.numpy as jnp

from namm.baselines.base import _make, register
from namm.policy import Policy


@register("full")
def full() -> Policy:
    """Keep every valid token (the full cache)."""
    return _make(lambda ctx: (jnp.zeros_like(ctx["acc"]), None), budget=None)
