"""Hand-designed eviction policies in the runtime, with the semantics of ``namm.baselines`` (reference 9).

Every baseline keeps exactly ``min(budget, tokens)`` per head at each update and always keeps the
newest token. Ranking is lexicographic: (newest, protected tier, score, slot index). Budgets: an
``int >= 1`` is a token count, a ``float`` in (0, 1] a fraction of the tokens seen by the layer
(latest position + 1), rounded up, at least 1.

Schedule (the NAMM one, for parity): prefill chunks of ``chunk_size`` (128), an update every
``update_interval`` (512) tokens on the buffered attention, plus one at the end of the prefill
(``final_update``, default True) so the cache holds exactly the budget when decoding starts.

  full          keep every token
  recency       the ``budget`` most recent tokens (sliding window)
  streamingllm  ``sinks`` oldest tokens (attention sinks) + the most recent ones
  h2o           accumulated attention (sum over every query seen while cached), heavy hitters
                + a recent window of ``recent_fraction * budget`` tokens
  l2            lowest key L2 norm (keys as cached, post-RoPE) + optional recent window; layers
                ``< skip_layers`` are not compressed
  snapkv        attention of the last ``window`` queries summed, max-pooled over ``kernel``
                neighbours (chronological order); the window's own tokens are protected
  random        uniform random scores from a seeded generator (per seed, layer and update)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from namm.torch.cache import PolicyUpdate, TorchPolicy
from namm.torch.selection import kept_indices, recent_mask


def check_budget(budget) -> int | float:
    """Validate a budget: int >= 1 (tokens) or float in (0, 1] (fraction of tokens seen)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget={budget!r}: use a token count (int >= 1) or a fraction (0 < float <= 1)")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget={budget}: a token count must be >= 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget}: a fraction must be in (0, 1]; pass an int for a token count")
    return budget


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


class BaselinePolicy(TorchPolicy):
    """Common shell: subclasses implement ``score(ctx) -> (score [B, H, S], protected [B, H, S] | None)``."""

    evicts = True

    accumulate = False

    def __init__(self, budget=None, chunk_size: int = 128, update_interval: int | None = 512, final_update: bool = True):
        if budget is not None:
            check_budget(budget)
        if update_interval is not None and update_interval % chunk_size:
            raise ValueError(f"update_interval={update_interval} must be a multiple of chunk_size={chunk_size}")
        self.budget = budget
        self.chunk_size = int(chunk_size)
        self.update_interval = int(update_interval) if update_interval else None
        self.final_update = bool(final_update)

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


class Recency(BaselinePolicy):
    """Sliding window: the ``budget`` most recent tokens."""

    name = "recency"

    def __init__(self, budget, **kw):
        super().__init__(budget, **kw)

    def score(self, ctx):
        return ctx["pos"].float(), None


class StreamingLLM(BaselinePolicy):
    """Attention sinks (the ``sinks`` oldest tokens) plus the most recent tokens."""

    name = "streamingllm"

    def __init__(self, budget, sinks: int = 4, **kw):
        if sinks < 0:
            raise ValueError(f"streamingllm: sinks={sinks} must be >= 0")
        super().__init__(budget, **kw)
        self.sinks = int(sinks)

    def score(self, ctx):
        pos, valid = ctx["pos"], ctx["valid"]
        oldest = torch.where(valid, -pos.float(), torch.full_like(pos, -(2**31), dtype=torch.float32))
        sink = valid & (rank_lex(torch.zeros_like(oldest), oldest) < self.sinks)
        return pos.float(), sink


class H2O(BaselinePolicy):
    """Heavy-hitter oracle: accumulated attention plus a recent window of ``recent_fraction * budget``."""

    name = "h2o"
    needs_attention = True
    accumulate = True

    def __init__(self, budget, recent_fraction: float = 0.5, **kw):
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"h2o: recent_fraction={recent_fraction} must be in [0, 1]")
        super().__init__(budget, **kw)
        self.recent_fraction = float(recent_fraction)

    def score(self, ctx):
        return ctx["acc"], self.recent_window(ctx, self.recent_fraction)


class L2(BaselinePolicy):
    """Lowest key L2 norm first (score -||k||, keys post-RoPE as cached); layers < skip_layers keep all."""

    name = "l2"

    def __init__(self, budget, recent_fraction: float = 0.0, skip_layers: int = 0, **kw):
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"l2: recent_fraction={recent_fraction} must be in [0, 1]")
        super().__init__(budget, **kw)
        self.recent_fraction = float(recent_fraction)
        self.skip_layers = int(skip_layers)

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        if layer_idx < self.skip_layers:
            return PolicyUpdate(state=state)
        return super().update(state, rows, keys, positions, valid, n_new, seen, layer_idx, final)

    def score(self, ctx):
        k = ctx["keys"].float()
        return -torch.sqrt((k * k).sum(-1)), self.recent_window(ctx, self.recent_fraction)  # -||k||_2


class SnapKV(BaselinePolicy):
    """Votes of the last ``window`` queries, max-pooled over ``kernel`` neighbours; window tokens protected."""

    name = "snapkv"
    needs_attention = True

    def __init__(self, budget, window: int = 32, kernel: int = 5, **kw):
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"snapkv: window={window} must be >= 1 and kernel={kernel} a positive odd number")
        super().__init__(budget, **kw)
        self.window = int(window)
        self.kernel = int(kernel)
        self.query_window = self.window  # the cache buffers only the last `window` queries

    def score(self, ctx):
        rows, valid = ctx["rows"], ctx["valid"]
        votes = rows[..., -self.window :, :].float().sum(-2)  # [B, H, S]; slots are chronological
        votes = torch.where(valid, votes, torch.full_like(votes, float("-inf")))
        pad = self.kernel // 2
        pooled = torch.nn.functional.max_pool1d(
            votes.reshape(-1, 1, votes.shape[-1]), self.kernel, stride=1, padding=pad
        ).reshape(votes.shape)
        protected = valid & (ctx["recency"] < min(self.window, rows.shape[-2]))  # the observation window
        return pooled, protected


class Random(BaselinePolicy):
    """Uniformly random eviction, deterministic per (seed, layer, tokens seen)."""

    name = "random"

    def __init__(self, budget, seed: int = 0, **kw):
        super().__init__(budget, **kw)
        self.seed = int(seed)

    def score(self, ctx):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx["layer"] * 65_537 + ctx["seen"])
        return torch.rand(ctx["pos"].shape, generator=g).to(ctx["pos"].device), None


class Full(BaselinePolicy):
    """Keep every token."""

    name = "full"
    evicts = False

    def __init__(self, **kw):
        kw.setdefault("update_interval", None)
        kw.setdefault("final_update", False)
        super().__init__(None, **kw)

    def score(self, ctx):
        return torch.zeros_like(ctx["pos"], dtype=torch.float32), None


BASELINES: dict[str, type[BaselinePolicy]] = {
    "recency": Recency,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "l2": L2,
    "snapkv": SnapKV,
    "random": Random,
}


def make_baseline(name: str, **knobs) -> BaselinePolicy:
    """``make_baseline("h2o", budget=0.25, recent_fraction=0.5)``; schedule knobs: chunk_size, update_interval, final_update."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    cls = BASELINES[name]
    own = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kw")}
    allowed = own | {"chunk_size", "update_interval", "final_update"}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise ValueError(f"baseline {name!r}: unknown option(s) {unknown}; it takes {sorted(allowed)}")
    if "budget" not in knobs:
        raise ValueError(f"baseline {name!r}: missing budget (e.g. budget=512 tokens or budget=0.25)")
    return cls(**knobs)
