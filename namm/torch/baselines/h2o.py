"""h2o: accumulated attention (sum over every query seen while cached), heavy hitters + a recent window of
``recent_fraction * budget`` tokens."""

from __future__ import annotations

from namm.torch.baselines.base import BaselinePolicy, register


@register("h2o")
class H2O(BaselinePolicy):
    """Heavy-hitter oracle: accumulated attention plus a recent window of ``recent_fraction * budget``."""

    needs_attention = True
    accumulate = True

    def __init__(self, budget, recent_fraction: float = 0.5, **kw):
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"h2o: recent_fraction={recent_fraction} must be in [0, 1]")
        super().__init__(budget, **kw)
        self.recent_fraction = float(recent_fraction)

    def score(self, ctx):
        return ctx["acc"], self.recent_window(ctx, self.recent_fraction)
