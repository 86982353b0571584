"""recency: the ``budget`` most recent tokens (sliding window)."""

from __future__ import annotations

from namm.torch.baselines.base import BaselinePolicy, register


@register("recency")
class Recency(BaselinePolicy):
    """Sliding window: the ``budget`` most recent tokens."""

    def __init__(self, budget, **kw):
        super().__init__(budget, **kw)

    def score(self, ctx):
        return ctx["pos"].float(), None
