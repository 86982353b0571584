"""l2: lowest key L2 norm (keys as cached, post-RoPE) + optional recent window; layers ``< skip_layers`` are not
compressed."""

from __future__ import annotations

import jax.numpy as jnp

from namm.baselines.base import _make, _recent_window, init_state, register
from namm.baselines.full import full
from namm.policy import Policy


@register("l2")
def l2(budget: int | float, recent_fraction: float = 0.0, skip_layers: int = 0) -> Policy:
    """Keep the keys with the lowest L2 norm (score -||k||); layers ``< skip_layers`` keep everything.

    Needs ``keys=[H, C, d]`` (as cached, post-RoPE) and ``layer=`` when ``skip_layers > 0``.
    """
    if not 0.0 <= recent_fraction <= 1.0:
        raise ValueError(f"l2: recent_fraction={recent_fraction} must be in [0, 1]")

    def score(ctx):
        if ctx["keys"] is None:
            raise ValueError("l2 policy needs keys=[kv_heads, capacity, head_dim] (cached keys) in update()")
        if skip_layers and ctx["layer"] is None:
            raise ValueError(f"l2 policy with skip_layers={skip_layers} needs layer= (the layer index) in update()")
        k = jnp.asarray(ctx["keys"], jnp.float32)
        return -jnp.sqrt(jnp.sum(k * k, axis=-1)), _recent_window(ctx, recent_fraction)   # -||k||_2

    policy = _make(score, budget=budget)
    if not skip_layers:
        return policy
    keep_all = full()

    def update(params, state, attention_rows, positions, valid, *, keys=None, rng=None, layer=None):
        if layer is not None and layer < skip_layers:
            if keys is None:
                raise ValueError("l2 policy needs keys=[kv_heads, capacity, head_dim] (cached keys) in update()")
            return keep_all.update(params, state, attention_rows, positions, valid)
        return policy.update(params, state, attention_rows, positions, valid, keys=keys, rng=rng, layer=layer)

    return Policy(init=init_state, update=update)
