"""l2: lowest key L2 norm (keys as cached, post-RoPE) + optional recent window; layers ``< skip_layers`` are not
compressed."""

from __future__ import annotations

import torch

from namm.torch.baselines.base import BaselinePolicy, register
from namm.torch.cache import PolicyUpdate


@register("l2")
class L2(BaselinePolicy):
    """Lowest key L2 norm first (score -||k||, keys post-RoPE as cached); layers < skip_layers keep all."""

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
