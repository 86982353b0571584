"""random: uniform random scores from a seeded generator (per seed, layer and update)."""

from __future__ import annotations

import torch

from namm.torch.baselines.base import BaselinePolicy, register


@register("random")
class Random(BaselinePolicy):
    """Uniformly random eviction, deterministic per (seed, layer, tokens seen)."""

    def __init__(self, budget, seed: int = 0, **kw):
        super().__init__(budget, **kw)
        self.seed = int(seed)

    def score(self, ctx):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx["layer"] * 65_537 + ctx["seen"])
        return torch.rand(ctx["pos"].shape, generator=g).to(ctx["pos"].device), None
