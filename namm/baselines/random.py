"""random: uniform random scores from an explicit PRNG key."""

from __future__ import annotations

import jax

from namm.baselines.base import _make, register
from namm.policy import Policy


@register("random")
def random(budget: int | float) -> Policy:
    """Uniformly random eviction; needs ``rng=`` (a PRNG key) in update."""

    def score(ctx):
        if ctx["rng"] is None:
            raise ValueError("random policy needs rng=jax.random.key(...) in update()")
        return jax.random.uniform(ctx["rng"], ctx["pos"].shape), None

    return _make(score, budget=budget)
