"""Token selection from scores (reference section 4.2-4.3). Pure JAX, per layer.

Shapes: H = KV heads of one layer, N = cache slots. For each head:
  1. invalid (padding / evicted) slots score -inf; the newest token scores +inf (always kept);
  2. optional hard caps: only the ``top_k`` best tokens are candidates, and only the ``cap`` best
     (a traced count: the runtime's ``budget``, see ``budget_cap``);
  3. a token is kept iff score >= threshold (exactly 0 is kept, so all-zero params keep everything);
  4. ``masked``: that per-head mask is the result. ``ragged_max`` (official): K = the largest
     per-head kept count of the layer; every head keeps its K best-scoring valid tokens (so heads
     that wanted fewer also keep their best negative tokens).
Ties in score are broken by slot index (lower index first), deterministically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from namm.config import SelectionConfig

Array = jax.Array


def newest_mask(positions: Array, valid: Array) -> Array:
    """``[H, N]`` True at the valid slot with the largest position in each head."""
    latest = jnp.max(jnp.where(valid, positions, jnp.iinfo(jnp.int32).min), axis=-1, keepdims=True)
    return valid & (positions == latest)


def rank_desc(key: Array) -> Array:
    """Rank of each entry in a descending sort along the last axis (0 = best; ties by index)."""
    order = jnp.argsort(-key, axis=-1, stable=True)
    idx = jnp.broadcast_to(jnp.arange(key.shape[-1]), key.shape)
    return jnp.put_along_axis(jnp.zeros_like(idx), order, idx, axis=-1, inplace=False)


def masked_scores(scores: Array, valid: Array, newest: Array) -> Array:
    """Scores with invalid slots at -inf and the newest token at +inf (NaN counts as invalid)."""
    s = jnp.where(valid & ~jnp.isnan(scores), scores.astype(jnp.float32), -jnp.inf)
    return jnp.where(newest & valid, jnp.inf, s)


def budget_cap(budget: float | int, seen: Array) -> Array:
    """A runtime budget as a token count: an int as is, a fraction of the ``seen`` tokens rounded (>= 1).

    The same rule as the PyTorch runtime's ``namm.torch.selection.budget_tokens`` (round half to even).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget={budget!r}; use a token count (int >= 1) or a fraction 0 < b <= 1")
    if isinstance(budget, float) and budget <= 1.0:
        return jnp.maximum(1, jnp.round(budget * jnp.asarray(seen, jnp.float32))).astype(jnp.int32)
    if isinstance(budget, float) and not budget.is_integer():
        raise ValueError(f"budget={budget!r}; a fraction must be <= 1, a token count an integer")
    return jnp.asarray(int(budget), jnp.int32)


def select(scores: Array, valid: Array, newest: Array, cfg: SelectionConfig = SelectionConfig(),
           cap: Array | None = None) -> Array:
    """Keep mask ``[H, N]`` from scores ``[H, N]``, validity ``[H, N]`` and the newest-token mask ``[H, N]``.

    ``cap``: optional traced token count applied like ``top_k`` (the runtime's budget).
    """
    s = masked_scores(scores, valid, newest)
    cand = valid & (s >= cfg.threshold)                                    # keep at s >= 0
    if cfg.top_k is not None or cap is not None or cfg.mode == "ragged_max":
        rank = rank_desc(s)
    if cfg.top_k is not None:
        cand = cand & (rank < int(cfg.top_k))                              # hard cap before the threshold
    if cap is not None:
        cand = cand & (rank < cap)
    if cfg.mode == "masked":
        return cand
    k = jnp.max(jnp.sum(cand, axis=-1))                                    # ragged max over the layer's heads
    return valid & (rank < k)


def kept_indices(keep: Array, k: int) -> tuple[Array, Array]:
    """Slot indices of the kept tokens in ascending order, padded to ``k``: (``[H, k]`` int32, ``[H, k]`` bool).

    The ragged-max gather of the official code (retained indices re-sorted ascending).
    """
    order = jnp.argsort(~keep, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    return order, jnp.take_along_axis(keep, order, axis=-1)
