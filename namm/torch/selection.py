"""Token selection from scores in PyTorch, mirroring ``namm.selection`` (reference section 4.2-4.3).

Per head: invalid slots score -inf, the newest token +inf (always kept); optional ``top_k`` cap;
keep where score >= threshold (0 is kept). ``masked``: that per-head mask. ``ragged_max`` (official):
K = the largest per-head kept count over the layer, every head keeps its K best valid tokens.
Ties are broken by slot index (lower first).
"""

from __future__ import annotations

import torch

from namm.config import SelectionConfig


def newest_mask(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[..., H, N]`` True at the valid slot with the largest position in each head."""
    low = torch.iinfo(positions.dtype).min
    latest = torch.where(valid, positions, torch.full_like(positions, low)).amax(dim=-1, keepdim=True)
    return valid & (positions == latest)


def recent_mask(positions: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., N]`` True for the ``n`` most recent valid tokens of each head (by position)."""
    key = torch.where(valid, positions.float(), torch.full_like(positions, -(2**31), dtype=torch.float32))
    return valid & (rank_desc(key) < n)


def rank_desc(key: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in a stable descending sort along the last axis (0 = best)."""
    order = torch.argsort(-key, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return rank


def masked_scores(scores: torch.Tensor, valid: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    s = torch.where(valid & ~torch.isnan(scores), scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    return torch.where(newest & valid, torch.full_like(s, float("inf")), s)


def select(scores, valid, newest, cfg: SelectionConfig = SelectionConfig(), batch_dims: int = 0) -> torch.Tensor:
    """Keep mask ``[..., H, N]`` from scores, validity and the newest-token mask (all ``[..., H, N]``, the last
    two broadcast against ``scores``). ``batch_dims``: leading axes of ``scores`` that index independent
    selections (a population of candidates); ``ragged_max``'s K is the largest count over the other axes."""
    s = masked_scores(scores, valid, newest)
    cand = valid & (s >= cfg.threshold)  # keep at s >= 0
    rank = rank_desc(s) if (cfg.top_k is not None or cfg.mode == "ragged_max") else None
    if cfg.top_k is not None:
        cand = cand & (rank < int(cfg.top_k))  # hard cap before the threshold
    if cfg.mode == "masked":
        return cand
    if batch_dims == 0:
        k = int(cand.sum(-1).max())  # ragged max over the layer's heads
        return valid & (rank < k)
    counts = cand.sum(-1).flatten(batch_dims).amax(-1)  # per selection
    return valid & (rank < counts.reshape(*counts.shape, *([1] * (cand.ndim - batch_dims))))


def kept_indices(keep: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending slot indices ``[..., H, K]`` of the kept tokens and their keep flags.

    K = the largest kept count over heads (or ``k``); heads with fewer are padded with their
    earliest dropped slots (flag False), and the indices are re-sorted so slots stay chronological.
    """
    if k is None:
        k = int(keep.sum(-1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :k]
    order, _ = torch.sort(order, dim=-1)
    return order, torch.gather(keep, -1, order)


def budget_tokens(budget: float | int, seen: int) -> int:
    """A budget as a token count: int >= 1 as is, a fraction 0 < b <= 1 of the tokens seen (rounded, >= 1)."""
    if isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"budget={budget!r}; use a token count (int >= 1) or a fraction 0 < b <= 1")
    if isinstance(budget, float) and budget <= 1.0:
        return max(1, int(round(budget * seen)))
    if isinstance(budget, float) and not budget.is_integer():
        raise ValueError(f"budget={budget!r}; a fraction must be <= 1, a token count an integer")
    return int(budget)


def top_budget(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices ``[..., H, min(k, N)]`` of the ``k`` best scores per head (ties: lower slot first)."""
    if valid is not None:
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    k = min(k, scores.shape[-1])
    order = torch.argsort(-scores, dim=-1, stable=True)[..., :k]
    return torch.sort(order, dim=-1).values
