"""What every runtime baseline shares: the budget rule, the lexicographic ranking, the :class:`BaselinePolicy`
shell (the NAMM schedule, the update) and the registry.

A baseline module subclasses :class:`BaselinePolicy` with its ``score`` and registers the class under its
name with ``@register("name")``; :func:`make_baseline` builds any registered one.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from namm.registry import add as add_to
from namm.registry import check_budget  # noqa: F401  (the one budget rule, re-exported)
from namm.torch.cache import PolicyUpdate, TorchPolicy
from namm.torch.selection import kept_indices, recent_mask


def resolve_budget(budget: int | float, seen: int) -> int:
    """Tokens to keep: the count itself, or max(1, ceil(fraction * seen))."""
    if isinstance(budget, int):
        return budget
    return max(1, math.ceil(budget * seen - 1e-6))


def rank_lex(tier: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Rank ``[..., N]`` in descending (tier, score) order, ties by slot index (0 = best)."""
    order1 = torch.argsort(-score.float(), dim=-1, stable=True)
    order2 = torch.argsort(-torch.gather(tier.float(), -1, order1), dim=-1, stable=True)
    order = torch.gather(order1, -1, order2)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def keep_mask(score, valid, newest, budget: int, protected=None) -> torch.Tensor:
    """Keep the best ``budget`` valid tokens: newest first, then ``protected``, then by score."""
    tier = torch.where(valid, 1, 0)
    if protected is not None:
        tier = torch.where(protected, 2, tier)
    tier = torch.where(newest, 3, tier)
    score = torch.where(valid, torch.nan_to_num(score.float(), nan=float("-inf")), float("-inf"))
    return valid & (rank_lex(tier, score) < budget)


SCHEDULE_KEYS = ("chunk_size", "update_interval", "final_update")   # what every baseline takes besides its own knobs


class BaselinePolicy(TorchPolicy):
    """Common shell: subclasses implement ``score(ctx) -> (score [B, H, S], protected [B, H, S] | None)``."""

    evicts = True

    accumulate = False

    def __init__(self, budget=None, chunk_size: int = 128, update_interval: int | None = 512,
                 final_update: bool = True):
        if budget is not None:
            check_budget(budget)
        if update_interval is not None and update_interval % chunk_size:
            raise ValueError(f"update_interval={update_interval} must be a multiple of chunk_size={chunk_size}")
        self.budget = budget
        self.chunk_size = int(chunk_size)
        self.update_interval = int(update_interval) if update_interval else None
        self.final_update = bool(final_update)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The knobs this baseline takes (sorted): its own ``__init__`` arguments and the schedule's."""
        own = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kw")}
        return tuple(sorted(own | set(SCHEDULE_KEYS)))

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "budget": self.budget, "chunk_size": self.chunk_size,
               "update_interval": self.update_interval, "final_update": self.final_update}
        for k in inspect.signature(type(self).__init__).parameters:
            if k not in out and k != "self" and hasattr(self, k):
                out[k] = getattr(self, k)
        return out

    def score(self, ctx: dict):
        raise NotImplementedError

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        b, h, s = positions.shape
        device = positions.device
        valid_full = torch.ones(b, h, s, dtype=torch.bool, device=device) if valid is None else valid
        is_new = (torch.arange(s, device=device) >= s - n_new).expand(b, h, s)
        latest = int(positions.max())
        newest = valid_full & (positions == latest)
        acc = None
        if self.accumulate:
            old = state.get("acc")
            acc = torch.zeros(b, h, s, device=device)
            if old is not None and s > n_new:
                acc[:, :, : s - n_new] = old
            acc = torch.where(is_new | ~valid_full, torch.zeros_like(acc), acc) + rows.float().sum(-2)
        n_keep = s if self.budget is None else resolve_budget(self.budget, latest + 1)
        ctx = dict(rows=rows, acc=acc, pos=positions, valid=valid_full, recency=latest - positions,
                   newest=newest, budget=n_keep, keys=keys, layer=layer_idx, seen=seen)
        score, protected = self.score(ctx)
        keep = keep_mask(score, valid_full, newest, n_keep, protected)
        new_state = {"acc": acc} if self.accumulate else {}
        if bool(keep.all()):
            return PolicyUpdate(state=new_state, scores=score)
        idx, _ = kept_indices(keep)
        return PolicyUpdate(state=new_state, keep=idx, scores=score)

    def recent_window(self, ctx, fraction: float):
        if fraction <= 0:
            return None
        return recent_mask(ctx["pos"], ctx["valid"], int(math.floor(ctx["budget"] * fraction)))


BASELINES: dict[str, type[BaselinePolicy]] = {}   # name -> class, filled by @register as the modules load


def register(name: str):
    """Class decorator: register a :class:`BaselinePolicy` subclass as baseline ``name`` (it sets ``cls.name``)."""

    def add(cls: type[BaselinePolicy]) -> type[BaselinePolicy]:
        add_to(BASELINES, name, cls)
        cls.name = name
        return cls

    return add


def make_baseline(name: str, **knobs) -> BaselinePolicy:
    """``make_baseline("h2o", budget=0.25, recent_fraction=0.5)``; schedule knobs: chunk_size, update_interval,
    final_update."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    cls = BASELINES[name]
    allowed = cls.options()
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"baseline {name!r}: unknown option(s) {unknown}; it takes {list(allowed)}")
    if "budget" not in knobs:
        raise ValueError(f"baseline {name!r}: missing budget (e.g. budget=512 tokens or budget=0.25)")
    return cls(**knobs)
