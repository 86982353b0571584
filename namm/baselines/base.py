"""What every JAX baseline shares: the slot state, the budget rule, the lexicographic ranking and the registry.

A baseline module builds its ``Policy`` with :func:`_make` from a score function and registers the
builder under its name with ``@register("name")``; :func:`make_baseline` builds any registered one.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from namm.registry import add as add_to
from namm.registry import check_budget  # noqa: F401  (the one budget rule, re-exported)
from namm.policy import Policy, _check_shapes, slot_info

Array = jax.Array


class BaselineState(NamedTuple):
    positions: Array  # [H, C] int32
    valid: Array      # [H, C] bool
    acc: Array        # [H, C] float32 accumulated attention (H2O); zero for other policies


def init_state(num_kv_heads: int, capacity: int) -> BaselineState:
    return BaselineState(jnp.zeros((num_kv_heads, capacity), jnp.int32),
                         jnp.zeros((num_kv_heads, capacity), bool),
                         jnp.zeros((num_kv_heads, capacity), jnp.float32))


def resolve_budget(budget: int | float, seen: Array) -> Array:
    """Tokens to keep (int32): the count itself, or max(1, ceil(fraction * seen))."""
    if isinstance(budget, int):
        return jnp.asarray(budget, jnp.int32)
    return jnp.maximum(1, jnp.ceil(budget * seen.astype(jnp.float32) - 1e-6)).astype(jnp.int32)


def _rank(tier: Array, score: Array) -> Array:
    """Rank ``[H, C]`` in descending (tier, score) order, ties by slot index."""
    c = tier.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), tier.shape)
    _, _, order = jax.lax.sort((-tier.astype(jnp.float32), -score.astype(jnp.float32), idx),
                               dimension=-1, num_keys=3, is_stable=True)
    return jnp.put_along_axis(jnp.zeros_like(idx), order, idx, axis=-1, inplace=False)


def _recent(pos: Array, valid: Array, n: Array) -> Array:
    """``[H, C]`` True for the ``n`` most recent valid tokens of each head."""
    key = jnp.where(valid, pos, jnp.iinfo(jnp.int32).min).astype(jnp.float32)
    return valid & (_rank(jnp.zeros_like(key), key) < n)


def _keep(score: Array, valid: Array, newest: Array, budget: Array, protected: Array | None = None) -> Array:
    """Keep the best ``budget`` valid tokens: newest first, then ``protected``, then by score."""
    tier = jnp.where(newest, 3, jnp.where(protected if protected is not None else False, 2,
                                          jnp.where(valid, 1, 0)))
    score = jnp.where(valid, jnp.nan_to_num(score, nan=-jnp.inf), -jnp.inf)
    return valid & (_rank(tier, score) < budget)


def _make(score_fn: Callable, *, budget, accumulate: bool = False) -> Policy:
    """Build a Policy from ``score_fn(ctx) -> (score [H, C], protected [H, C] | None)`` (None budget = keep all)."""
    if budget is not None:
        check_budget(budget)

    def update(params, state: BaselineState, attention_rows, positions, valid, *, keys=None, rng=None, layer=None):
        _check_shapes(state, attention_rows, valid)
        valid = jnp.asarray(valid, bool)
        pos, is_new, recency, newest = slot_info(state, positions, valid)
        rows = attention_rows.astype(jnp.float32)                                    # [H, n, C]
        acc = jnp.where(is_new | ~valid, 0.0, state.acc) + rows.sum(axis=-2)         # accumulated attention
        latest = jnp.max(jnp.where(valid, pos, -1))
        n_keep = (jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32) if budget is None
                  else resolve_budget(budget, latest + 1))
        ctx = dict(rows=rows, acc=acc, pos=pos, valid=valid, recency=recency, newest=newest,
                   budget=n_keep, keys=keys, rng=rng, layer=layer)
        score, protected = score_fn(ctx)
        keep = _keep(score, valid, newest, n_keep, protected)
        new_acc = jnp.where(keep, acc, 0.0) if accumulate else jnp.zeros_like(acc)
        return BaselineState(pos, keep, new_acc), jnp.where(valid, score, -jnp.inf), keep

    return Policy(init=init_state, update=update)


def _recent_window(ctx, fraction: float) -> Array | None:
    if fraction <= 0:
        return None
    n = jnp.floor(ctx["budget"].astype(jnp.float32) * fraction).astype(jnp.int32)
    return _recent(ctx["pos"], ctx["valid"], n)


BASELINES: dict[str, Callable[..., Policy]] = {}   # name -> builder, filled by @register as the modules load


def register(name: str) -> Callable:
    """Decorator: register ``fn(budget, **knobs) -> Policy`` as baseline ``name``; its signature lists its knobs."""

    def add(fn: Callable[..., Policy]) -> Callable[..., Policy]:
        add_to(BASELINES, name, fn)
        return fn

    return add


def make_baseline(name: str, **knobs) -> Policy:
    """Build a baseline by name, e.g. ``make_baseline("h2o", budget=0.25, recent_fraction=0.5)``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    fn = BASELINES[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(knobs) - set(params))
    if unknown:
        raise ValueError(f"baseline {name!r}: unknown option(s) {unknown}; it takes {sorted(params)}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in knobs]
    if missing:
        raise ValueError(f"baseline {name!r}: missing {missing} (e.g. budget=512 tokens or budget=0.25)")
    return fn(**knobs)
