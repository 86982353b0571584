"""full: keep every token, as a :class:`BaselinePolicy`.

Not registered: ``policy=full`` builds the cache's own :class:`namm.torch.cache.FullPolicy`
(``namm.torch.policies.build_policy``), which never runs an update.
"""

from __future__ import annotations

import torch

from namm.torch.baselines.base import BaselinePolicy


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
