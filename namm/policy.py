"""One NAMM policy update for one layer: features + scorer + selection, as a pure jit-able step.

Fixed-capacity buffers: a layer owns C slots. The caller writes each token into a slot and says
which slots hold a token (``valid``) and its absolute position (``positions``). At an update
(every ``update_interval`` tokens) the caller passes the GQA-averaged attention rows of the n new
queries onto all C slots, ``attention_rows [Hkv, n, C]`` (zero where a query may not attend: later
new tokens, invalid slots).

Which slots are new: slot c of head h is *new* at this update iff ``valid[h, c]`` and either the
previous state had it invalid or its position changed (a slot freed by an eviction and reused).
New tokens must be the n newest positions (their index in the block is j = n - 1 - recency). New
slots start from a zero EMA and a zero left context; old slots carry theirs.

How the left context is carried: the STFT of slot c runs over the series
``[left_context[h, c] (n_fft - hop columns) | attention_rows[h, :, c] (n columns)]``; after the update
the last n_fft - hop columns of that series become the slot's left context, so the first frame of
the next update overlaps the previous one exactly as an uninterrupted STFT would.

After the update, ``new_state.valid == keep``: evicted slots are free (their EMA and context are
zeroed) and the caller may write new tokens into them. ``new_state.ema`` holds the raw
(un-normalised) EMA of the kept tokens: feed it with ``new_state.valid`` to ``NormStats.update``
on a calibration pass with the full cache.

Validity and positions are per slot, so left padding or per-head eviction never shifts a mask (the
official code slices the last N columns of one absolute-length mask, correct only for batch 1
without left padding).

``update`` is vmappable over a population of parameter vectors (``jax.vmap(step, (0, None, ...))``)
and over layers (stack states/rows with a leading layer axis; parameters shared).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from namm.config import NAMMConfig
from namm.features import NormParams, NormStats, token_features, with_pooled
from namm.scoring import score_tokens
from namm.selection import budget_cap, select

Array = jax.Array


class PolicyState(NamedTuple):
    ema: Array           # [H, C, S] raw EMA spectrogram of each slot (pre-normalisation)
    left_context: Array  # [H, C, n_fft - hop] last series columns of the previous update
    positions: Array     # [H, C] int32 absolute position of each slot's token
    valid: Array         # [H, C] bool slot holds a retained token


class Policy(NamedTuple):
    """A memory policy as a pair of functions (optax-style); NAMM and every baseline share it.

    ``init(num_kv_heads, capacity) -> state``;
    ``update(params, state, attention_rows [H, n, C], positions [C] | [H, C], valid [H, C], *,
    keys=None [H, C, d], rng=None, layer=None) -> (new_state, scores [H, C], keep [H, C])``.
    """

    init: Callable
    update: Callable


def init_state(num_kv_heads: int, capacity: int, cfg: NAMMConfig) -> PolicyState:
    """Empty state: every slot invalid, zero EMA and zero left context."""
    f = cfg.features
    return PolicyState(
        ema=jnp.zeros((num_kv_heads, capacity, f.spec_dim), jnp.float32),
        left_context=jnp.zeros((num_kv_heads, capacity, f.context), jnp.float32),
        positions=jnp.zeros((num_kv_heads, capacity), jnp.int32),
        valid=jnp.zeros((num_kv_heads, capacity), bool),
    )


def _check_shapes(state, attention_rows, valid, hop: int | None = None) -> None:
    h, c = state.valid.shape
    if attention_rows.ndim != 3 or attention_rows.shape[0] != h or attention_rows.shape[2] != c:
        raise ValueError(f"policy update: attention_rows has shape {tuple(attention_rows.shape)}, "
                         f"expected [kv_heads={h}, n_new, capacity={c}] (GQA-average it first)")
    if tuple(valid.shape) != (h, c):
        raise ValueError(f"policy update: valid has shape {tuple(valid.shape)}, expected [{h}, {c}]")
    if hop is not None and attention_rows.shape[1] % hop:
        raise ValueError(f"policy update: n_new={attention_rows.shape[1]} new queries is not a multiple "
                         f"of hop={hop}; buffer rows until the next update boundary")


def slot_info(state, positions: Array, valid: Array) -> tuple[Array, Array, Array, Array]:
    """(positions ``[H, C]`` int32, is_new ``[H, C]``, recency ``[H, C]`` (newest 0), newest ``[H, C]``)."""
    pos = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), valid.shape)
    is_new = valid & (~state.valid | (state.positions != pos))
    latest = jnp.max(jnp.where(valid, pos, jnp.iinfo(jnp.int32).min))  # newest token of the layer
    recency = jnp.where(valid, latest - pos, 0)
    newest = valid & (pos == latest)
    return pos, is_new, recency, newest


def _as_norm(norm_stats) -> NormParams | None:
    if norm_stats is None or isinstance(norm_stats, NormParams):
        return norm_stats
    if isinstance(norm_stats, NormStats):
        return norm_stats.finalize()
    mean, var = norm_stats
    return NormParams(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32))


def update(params_flat: Array, norm_stats, state: PolicyState, attention_rows: Array, positions: Array,
           valid: Array, cfg: NAMMConfig, budget: float | int | None = None) -> tuple[PolicyState, Array, Array]:
    """One NAMM step for one layer.

    params_flat ``[P]``; norm_stats: ``NormParams`` (frozen mean/var ``[S]``), a ``NormStats`` (finalised
    here) or None (no normalisation); attention_rows ``[Hkv, n, C]``; positions ``[C]`` or ``[Hkv, C]``;
    valid ``[Hkv, C]``; budget: optional cap as the runtime's ``NAMMPolicy(budget=...)`` applies it (a
    token count, or a fraction of the tokens seen = newest position + 1). Returns (new_state, scores
    ``[Hkv, C]``, keep ``[Hkv, C]``).
    """
    _check_shapes(state, attention_rows, valid, cfg.features.hop)
    valid = jnp.asarray(valid, bool)
    pos, is_new, recency, newest = slot_info(state, positions, valid)
    feats, ema, ctx = token_features(attention_rows, state.left_context, state.ema, is_new, recency,
                                     _as_norm(norm_stats), cfg)            # [H, C, F], [H, C, S], [H, C, ctx]
    feats = with_pooled(feats, pos, valid, cfg)                         # + pooled spectrogram if pool_kernel
    scores = score_tokens(params_flat, cfg, feats, valid, order=pos)     # [H, C]
    cap = None if budget is None else budget_cap(budget, jnp.max(jnp.where(valid, pos, -1)) + 1)
    keep = select(scores, valid, newest, cfg.selection, cap)             # [H, C]
    new_state = PolicyState(ema=jnp.where(keep[..., None], ema, 0.0),
                            left_context=jnp.where(keep[..., None], ctx, 0.0),
                            positions=pos, valid=keep)
    return new_state, scores, keep


def make_update(cfg: NAMMConfig, norm_stats=None, budget: float | int | None = None) -> Callable:
    """``(params, state, attention_rows, positions, valid) -> (new_state, scores, keep)`` with cfg, norm and budget bound."""
    norm = _as_norm(norm_stats)
    if budget is not None:
        budget_cap(budget, 1)  # validates

    def step(params, state, attention_rows, positions, valid):
        return update(params, norm, state, attention_rows, positions, valid, cfg, budget)

    return step


def make_policy(cfg: NAMMConfig, norm_stats=None, budget: float | int | None = None) -> Policy:
    """NAMM behind the common ``Policy`` interface (``keys``, ``rng``, ``layer`` are accepted and unused).

    ``budget``: the runtime cap (``NAMMPolicy(budget=...)``) simulated on top of the threshold.
    """
    step = make_update(cfg, norm_stats, budget)

    def policy_update(params, state, attention_rows, positions, valid, *, keys=None, rng=None, layer=None):
        return step(params, state, attention_rows, positions, valid)

    return Policy(init=functools.partial(init_state, cfg=cfg), update=policy_update)
