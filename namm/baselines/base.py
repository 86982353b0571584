"""Hand-designed eviction policies behind the NAMM step interface (reference section 9). Pure JAX.

Every baseline is a ``Policy(init, update)`` (see ``namm.policy``) with the same fixed-capacity slot
semantics as NAMM: ``update(params, state, attention_rows [H, n, C], positions [C] | [H, C], valid [H, C],
*, keys=None [H, C, d], rng=None, layer=None) -> (new_state, scores [H, C], keep [H, C])``;
``params`` is ignored (pass None). Each keeps exactly ``min(budget, valid tokens)`` per head and
always keeps the newest token. Ranking is lexicographic: (newest, protected tier, score, slot index).

Budgets: an ``int >= 1`` is a token count; a ``float`` in (0, 1] is a fraction of the tokens seen by
the layer (latest position + 1), rounded up, at least 1.

  full          keep every valid token
  recency       the ``budget`` most recent tokens (sliding window)
  streamingllm  ``sinks`` oldest tokens (attention sinks) + the most recent ones
  h2o           accumulated attention (sum over every query seen while cached), heavy hitters
                + a recent window of ``recent_fraction * budget`` tokens
  l2            lowest key L2 norm (keys as cached, post-RoPE) + optional recent window; layers
                ``< skip_layers`` are not compressed
  snapkv        attention of the last ``window`` queries summed, max-pooled over ``kernel``
                neighbouring tokens (chronological order); the window's own tokens are protected
  random        uniform random scores from an explicit PRNG key
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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


def check_budget(budget) -> int | float:
    """Validate a budget: int >= 1 (tokens) or float in (0, 1] (fraction of tokens seen)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget={budget!r}: use a token count (int >= 1) or a fraction (0 < float <= 1)")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget={budget}: a token count must be >= 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget}: a fraction must be in (0, 1]; pass an int for a token count")
    return budget


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


# --------------------------------------------------------------------------------------------
# The baselines
# --------------------------------------------------------------------------------------------

def full() -> Policy:
    """Keep every valid token (the full cache)."""
    return _make(lambda ctx: (jnp.zeros_like(ctx["acc"]), None), budget=None)


def recency(budget: int | float) -> Policy:
    """Sliding window: the ``budget`` most recent tokens."""
    return _make(lambda ctx: (ctx["pos"].astype(jnp.float32), None), budget=budget)


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


def h2o(budget: int | float, recent_fraction: float = 0.5) -> Policy:
    """Heavy-hitter oracle: accumulated attention, plus a recent window of ``recent_fraction * budget``."""
    if not 0.0 <= recent_fraction <= 1.0:
        raise ValueError(f"h2o: recent_fraction={recent_fraction} must be in [0, 1]")
    return _make(lambda ctx: (ctx["acc"], _recent_window(ctx, recent_fraction)), budget=budget,
                 accumulate=True)


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


def random(budget: int | float) -> Policy:
    """Uniformly random eviction; needs ``rng=`` (a PRNG key) in update."""

    def score(ctx):
        if ctx["rng"] is None:
            raise ValueError("random policy needs rng=jax.random.key(...) in update()")
        return jax.random.uniform(ctx["rng"], ctx["pos"].shape), None

    return _make(score, budget=budget)


BASELINES: dict[str, Callable[..., Policy]] = {
    "full": full, "recency": recency, "streamingllm": streamingllm, "h2o": h2o, "l2": l2,
    "snapkv": snapkv, "random": random,
}


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
