"""snapkv: attention of the last ``window`` queries summed, max-pooled over ``kernel`` neighbours (chronological
order); the window's own tokens are protected."""

from __future__ import annotations

import torch

from namm.torch.baselines.base import BaselinePolicy, register


@register("snapkv")
class SnapKV(BaselinePolicy):
    """Votes of the last ``window`` queries, max-pooled over ``kernel`` neighbours; window tokens protected."""

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
