"""streamingllm: ``sinks`` oldest tokens (attention sinks) + the most recent ones."""

from __future__ import annotations

import jax.numpy as jnp

from namm.baselines.base import _make, _rank, register
from namm.policy import Policy


@register("streamingllm")
def streamingllm(budget: int | float, sinks: int = 4) -> Policy:
    """Attention sinks (the ``sinks`` oldest tokens) plus the most recent tokens."""
    if sinks < 0:
        raise ValueError(f"streamingllm: sinks={sinks} must be >= 0")

    def score(ctx):
        pos, valid = ctx["pos"], ctx["valid"]
        oldest = jnp.where(valid, -pos, jnp.iinfo(jnp.int32).min).astype(jnp.float32)
        sink = valid & (_rank(jnp.zeros_like(oldest), oldest) < sinks)
        return pos.astype(jnp.float32), sink

    return _make(score, budget=budget)
