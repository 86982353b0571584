"""Attention backend ``"namm"``: SDPA for the output, policy hooks, masks from each layer's own lengths.

Registered with ``AttentionInterface`` and ``AttentionMaskInterface`` under :data:`ATTN_NAME`. For a
layer of a :class:`namm.torch.cache.NAMMCache` the causal mask is built from that layer's physical
length (layers may hold different numbers of tokens), the post-RoPE queries are handed to the layer
when its policy needs attention rows, and the layer may evict right after its attention output is
computed. A layer of a :class:`namm.torch.population.PopulationCache` computes its own attention
(``attend``: shared keys, one keep mask per candidate). Any other cache (or none) gets exactly
transformers' ``sdpa`` behaviour.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "namm"

_pending = threading.local()


def set_pending(layer) -> None:
    """Mark ``layer`` as the cache layer whose attention runs next (called from ``NAMMLayer.update``)."""
    _pending.layer = layer


def take_pending(layer_idx: int):
    """Return and clear the pending cache layer if it belongs to ``layer_idx``."""
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    if layer is not None and layer.layer_idx == layer_idx:
        return layer
    return None


def peek_pending():
    return getattr(_pending, "layer", None)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[q, kv]``: query i (the i-th of the last ``q_len`` slots) sees physical slots ``j <= kv - q + i``."""
    offset = kv_len - q_len
    return torch.arange(kv_len, device=device)[None, :] <= (torch.arange(q_len, device=device)[:, None] + offset)


def attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    block: int = 128,
) -> torch.Tensor:
    """GQA-averaged attention probabilities of the last ``n`` queries over all ``S`` cached keys.

    queries ``[B, Hq, n, d]`` (post-RoPE, the last n physical slots), keys ``[B, Hkv, S, d]``,
    valid ``[B, Hkv, S]`` or None -> ``[B, Hkv, n, S]`` float32. ``softmax(q k^T * scale + mask)``
    computed in fp32 in blocks of ``block`` queries, then averaged over each GQA group (query head
    h belongs to KV head ``h // (Hq / Hkv)``, as ``repeat_kv``).
    """
    b, hq, n, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    group = hq // hkv
    kt = keys.float().transpose(-1, -2)  # [B, Hkv, d, S]
    out = torch.empty(b, hkv, n, s, dtype=torch.float32, device=queries.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        q = queries[:, :, start:stop].float().reshape(b, hkv, group * (stop - start), d) * scaling
        logits = torch.matmul(q, kt).view(b, hkv, group, stop - start, s)  # [B, Hkv, G, q, S]
        # query start+i sits at physical slot s - n + start + i: only slots after s - n + start can be future
        first = s - n + start + 1
        if first < s:
            future = torch.arange(first, s, device=queries.device)[None, :] > (
                torch.arange(start, stop, device=queries.device)[:, None] + (s - n)
            )  # [q, S - first]
            logits[..., first:].masked_fill_(future, float("-inf"))
        if valid is not None:
            logits.masked_fill_(~valid[:, :, None, None, :], float("-inf"))
        out[:, :, start:stop] = torch.softmax(logits, dim=-1).mean(dim=2)
    return out


def namm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """query ``[B, Hq, q, d]``, key/value ``[B, Hkv, S, d]`` (post-RoPE, cache included) -> ``([B, q, Hq, d], None)``."""
    layer = take_pending(getattr(module, "layer_idx", -1))
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if hasattr(layer, "attend"):  # a population layer (namm.torch.population): shared keys, per-candidate masks
        return layer.attend(query, scaling), None
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = layer.attention_mask(q_len, kv_len, num_q_heads=query.shape[1])
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    layer.after_attention(query, scaling)
    return out, None


def namm_mask(*args, **kwargs):
    """The ``sdpa`` mask (used as is for other caches); NAMM cache layers build theirs from their own lengths."""
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the backend and its mask function (idempotent); returns the backend name."""
    AttentionInterface.register(ATTN_NAME, namm_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, namm_mask)
    return ATTN_NAME


register()
