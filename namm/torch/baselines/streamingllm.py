"""streamingllm: ``sinks`` oldest tokens (attention sinks) + the most recent ones."""

from __future__ import annotations

import torch

from namm.torch.baselines.base import BaselinePolicy, rank_lex, register


@register("streamingllm")
class StreamingLLM(BaselinePolicy):
    """Attention sinks (the ``sinks`` oldest tokens) plus the most recent tokens."""

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
