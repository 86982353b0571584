"""PyTorch runtime for NAMM policies (no JAX import): cache layer, attention backend, policies, greedy loop.

    from namm.torch import build_policy, greedy_generate
    policy = build_policy({"name": "namm", "path": "policy_dir"})     # or {"name": "h2o", "budget": 0.25}
    out = greedy_generate(model, context_ids, question_ids, 64, policy=policy)

    cache = policy.make_cache(model)                                   # switches model to the "namm" backend
    model.generate(ids, past_key_values=cache, prefill_chunk_size=cache.chunk_size, max_new_tokens=64)
"""

from namm.torch.cache import (FullPolicy, NAMMCache, NAMMLayer, PolicyUpdate, RecentQueries, TorchPolicy,
                              model_signature)
from namm.torch.generate import GenerationOutput, greedy_generate
from namm.torch.policies import PolicyConfigError, build_policy

__all__ = [
    "FullPolicy",
    "RecentQueries",
    "GenerationOutput",
    "NAMMCache",
    "NAMMLayer",
    "PolicyConfigError",
    "PolicyUpdate",
    "TorchPolicy",
    "build_policy",
    "greedy_generate",
    "model_signature",
]
