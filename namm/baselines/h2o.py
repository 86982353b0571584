"""h2o: accumulated attention (sum over every query seen while cached), heavy hitters + a recent window of
``recent_fraction * budget`` tokens."""

from __future__ import annotations

from namm.baselines.base import _make, _recent_window, register
from namm.policy import Policy


@register("h2o")
def h2o(budget: int | float, recent_fraction: float = 0.5) -> Policy:
    """Heavy-hitter oracle: accumulated attention, plus a recent window of ``recent_fraction * budget``."""
    if not 0.0 <= recent_fraction <= 1.0:
        raise ValueError(f"h2o: recent_fraction={recent_fraction} must be in [0, 1]")
    return _make(lambda ctx: (ctx["acc"], _recent_window(ctx, recent_fraction)), budget=budget,
                 accumulate=True)
