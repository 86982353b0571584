"""The memory-managed KV cache: one :class:`NAMMLayer` per decoder layer, driven by a :class:`TorchPolicy`.

Each layer knows two lengths: ``seen`` (tokens processed, what ``get_seq_length`` returns so RoPE
positions stay right) and ``stored`` (tokens physically held). It keeps per-token original
positions ``[B, Hkv, S]``, an optional validity mask (``masked`` selection), the policy's state
buffers (token axis 2) and the post-RoPE queries that arrived since the last policy update.
Eviction is a gather on keys, values, positions, validity and every state buffer, assigned back:
the memory is really freed and per-layer lengths are free to differ.

Updates fire right after a layer's attention output is computed, whenever the number of seen
tokens reaches a logical multiple of ``policy.update_interval`` (paper: 512), and once at the end
of the prefill when ``policy.final_update`` is set (called by :func:`generate.greedy_generate`, or
lazily before the first single-token step under ``model.generate``).
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from namm.torch import attention as _attention


class CacheConfigError(ValueError):
    """A model/cache combination the runtime cannot serve."""


@dataclass
class PolicyUpdate:
    """What a policy returns for one layer update.

    state: buffers with token axis 2, covering all ``S`` stored tokens (before eviction).
    keep: ``[B, Hkv, K]`` ascending slot indices to keep, or None (keep everything).
    valid: ``[B, Hkv, K]`` bool (``masked`` selection: slots kept only for rectangularity are False), or None.
    scores: optional ``[B, Hkv, S]`` scores, for inspection.
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    keep: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class TorchPolicy:
    """Base class of every runtime policy (full cache, NAMM, baselines).

    Subclasses set ``name``, ``needs_attention`` (buffer queries and hand GQA-averaged attention
    rows to ``update``), ``needs_keys``, ``update_interval`` (None: never update), ``final_update``
    (also update at the end of the prefill) and ``chunk_size`` (prefill chunk), and implement
    :meth:`update`. ``evicts``: a compressing policy, refused by the cache when its schedule never
    updates (no ``update_interval`` and no ``final_update``). ``row_multiple``: an update reads its attention
    rows in blocks of this many queries (the NAMM's STFT hop); a refresh that carries the policy state
    (``NAMMCache.reselect(carried=...)``) advances by whole blocks.
    """

    name: str = "base"
    evicts: bool = False
    needs_attention: bool = False
    update_interval: int | None = None
    final_update: bool = False
    chunk_size: int | None = None
    attention_block: int = 128
    row_multiple: int = 1

    def update(
        self,
        state: dict[str, torch.Tensor],
        rows: torch.Tensor | None,
        keys: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        n_new: int,
        seen: int,
        layer_idx: int,
        final: bool,
    ) -> PolicyUpdate:
        """One policy step for one layer.

        state: buffers covering the ``S - n_new`` tokens stored at the previous update (token axis 2).
        rows: ``[B, Hkv, n_new, S]`` float32 GQA-averaged attention of the new queries (or None).
        keys: ``[B, Hkv, S, d]`` post-RoPE keys. positions: ``[B, Hkv, S]`` original positions.
        valid: ``[B, Hkv, S]`` bool or None (all valid). The last ``n_new`` slots are the new tokens.
        """
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Raise if this policy cannot serve ``model`` (e.g. per-layer parameters for other shapes)."""

    def make_cache(self, model) -> "NAMMCache":
        """A fresh cache for ``model``; switches the model to the ``"namm"`` attention backend.

        Then ``model.generate(ids, past_key_values=cache, prefill_chunk_size=cache.chunk_size)``
        evicts at the same points as :func:`namm.torch.generate.greedy_generate`.
        """
        return NAMMCache(model, self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class FullPolicy(TorchPolicy):
    """Keep every token (the full-cache reference)."""

    name = "full"

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        return PolicyUpdate(state=state)


class RecentQueries(FullPolicy):
    """Keep every token and buffer the post-RoPE queries of the last ``window`` tokens (never evicts).

    The verifier's cache in refreshed self-speculation: a compressing policy forked from it
    (``NAMMCache.fork``) reads the attention of these queries over the full cache to re-select its tokens.
    """

    name = "full"
    needs_attention = True

    def __init__(self, window: int):
        if int(window) < 1:
            raise ValueError(f"window={window} must be >= 1 (queries to buffer)")
        self.query_window = int(window)


def check_schedule(policy: TorchPolicy) -> None:
    """Raise ``CacheConfigError`` for a compressing policy whose schedule never updates (it would keep 100 %)."""
    if policy.evicts and not policy.update_interval and not policy.final_update:
        raise CacheConfigError(
            f"policy {policy.name!r} would never evict: update_interval="
            f"{policy.update_interval} and final_update=False; set update_interval (e.g. 512) or final_update=true"
        )


class NAMMLayer(DynamicLayer):
    """A ``DynamicLayer`` whose content is managed by a policy; see the module docstring."""

    is_croppable = True

    def __init__(self, policy: TorchPolicy, layer_idx: int, owner: "NAMMCache | None" = None):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        # a weak reference: the cache holds its layers, so a strong one back would make every cache a reference
        # cycle, freed only when Python's cycle collector next runs (tensors do not count towards running it:
        # a loop of prefills could hold gigabytes of dead caches)
        self._owner = None if owner is None else weakref.ref(owner)
        self.seen = 0  # tokens processed (logical length)
        self.last_update_seen = 0  # `seen` at the last policy update
        self.positions: torch.Tensor | None = None  # [B, Hkv, S] long
        self.valid: torch.Tensor | None = None  # [B, Hkv, S] bool, None = all valid
        self.state: dict[str, torch.Tensor] = {}
        self.queries: list[torch.Tensor] = []  # post-RoPE queries since the last update, [B, Hq, q, d]
        self.scaling: float | None = None
        self.frozen = False  # no more policy updates (question kept out of compression)
        self.prefill_closed = False
        self.last_q_len = 0
        self.num_updates = 0
        self.last_scores: torch.Tensor | None = None
        # (state, seen) of the last update, before its eviction, when it covered every token seen and the
        # owner records (``NAMMCache.record_state``): what a later refresh carries (``reselect(carried=...)``)
        self.full_state: tuple[dict[str, torch.Tensor], int] | None = None

    # --- lengths -------------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    @property
    def n_pending(self) -> int:
        return self.seen - self.last_update_seen

    @property
    def owner(self) -> "NAMMCache | None":
        """The ``NAMMCache`` this layer belongs to (None: a layer on its own, or its cache is gone)."""
        return None if self._owner is None else self._owner()

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    # --- transformers hooks --------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[B, Hkv, q, d]`` keys/values; returns the full stored keys/values."""
        stale = _attention.peek_pending()
        if stale is not None:
            _attention.set_pending(None)
            raise CacheConfigError(
                "a NAMM cache layer was updated but its attention never ran through the 'namm' backend; "
                "create the cache with policy.make_cache(model) and do not change the attention implementation"
            )
        if key_states.shape[0] != 1:
            raise CacheConfigError(
                f"the NAMM cache serves one unpadded sequence at a time, got a batch of {key_states.shape[0]}; "
                "loop over the sequences"
            )
        q_len = key_states.shape[-2]
        explicit = self.owner is not None and self.owner.explicit_prefill
        if q_len == 1 and self.last_q_len > 1 and not self.prefill_closed and not explicit:
            self.close_prefill()  # model.generate: the first decode step follows the prefill
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h = key_states.shape[0], key_states.shape[1]
        new_pos = torch.arange(self.seen, self.seen + q_len, device=key_states.device).expand(b, h, q_len)
        if self.stored == 0:
            self.keys, self.values = key_states, value_states
            self.positions = new_pos.clone()
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, new_pos], dim=-1)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(b, h, q_len)], dim=-1)
        self.seen += q_len
        self.last_q_len = q_len
        if self.owner is not None:
            self.owner.track_bytes()
        _attention.set_pending(self)
        return self.keys, self.values

    def attention_mask(self, q_len: int, kv_len: int, num_q_heads: int) -> torch.Tensor | None:
        """Bool mask for SDPA from this layer's physical length (None where SDPA's defaults are exact)."""
        if self.valid is None and (q_len == 1 or kv_len == q_len):
            return None  # decode step, or causal over a fresh cache (SDPA is_causal)
        mask = _attention.causal_mask(q_len, kv_len, self.keys.device)[None, None]  # [1, 1, q, S]
        if self.valid is not None:
            group = num_q_heads // self.valid.shape[1]
            valid = self.valid.repeat_interleave(group, dim=1)  # [B, Hq, S]
            mask = mask & valid[:, :, None, :]
        return mask

    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        """Buffer the new queries if the policy needs attention rows; update at interval multiples."""
        if self.frozen:
            return
        if self.policy.needs_attention:
            self.queries.append(query.detach())
            self.scaling = scaling
            window = getattr(self.policy, "query_window", None)
            if window:
                self._trim_queries(window)
        interval = self.policy.update_interval
        if interval and self.seen // interval > self.last_update_seen // interval:
            self.run_update(final=False)

    def _trim_queries(self, window: int) -> None:
        """Keep only the last ``window`` buffered queries (policies that read the newest rows only)."""
        total = sum(q.shape[2] for q in self.queries)
        while self.queries and total - self.queries[0].shape[2] >= window:
            total -= self.queries.pop(0).shape[2]
        if total > window:  # a copy: a view would keep the whole chunk's queries alive
            self.queries[0] = self.queries[0][:, :, total - window :].clone()

    # --- policy ----------------------------------------------------------------------------------
    def pending_rows(self) -> torch.Tensor | None:
        """``[B, Hkv, n_new, S]`` float32 attention rows of the queries buffered since the last update."""
        if not self.queries:
            return None
        queries = torch.cat(self.queries, dim=2) if len(self.queries) > 1 else self.queries[0]
        return _attention.attention_rows(
            queries, self.keys, self.scaling, self.valid, block=self.policy.attention_block
        )

    def run_update(self, final: bool) -> None:
        n_new = self.n_pending
        if n_new == 0 or self.stored == 0:
            return
        rows = self.pending_rows() if self.policy.needs_attention else None
        out = self.policy.update(
            self.state, rows, self.keys, self.positions, self.valid, n_new, self.seen, self.layer_idx, final
        )
        self.queries = []
        self.last_update_seen = self.seen
        self.num_updates += 1
        self.apply(out)

    def apply(self, out: PolicyUpdate) -> None:
        """Take a policy's decision: its state, its scores, and the eviction (keep indices, validity flags)."""
        self.last_scores = out.scores
        self.state = out.state
        if self.owner is not None and self.owner.record_state and self.stored == self.seen:
            self.full_state = (out.state, self.seen)
        if out.keep is not None:
            self.gather(out.keep)
            if out.valid is not None:
                self.valid = None if bool(out.valid.all()) else out.valid

    def gather(self, keep: torch.Tensor) -> None:
        """Keep slots ``keep [B, Hkv, K]`` (ascending) in keys, values, positions, validity and state."""
        d = self.keys.shape[-1]
        idx = keep.unsqueeze(-1)
        self.keys = torch.gather(self.keys, 2, idx.expand(*keep.shape, d))
        self.values = torch.gather(self.values, 2, idx.expand(*keep.shape, self.values.shape[-1]))
        self.positions = torch.gather(self.positions, 2, keep)
        if self.valid is not None:
            self.valid = torch.gather(self.valid, 2, keep)
        self.state = {k: gather_tokens(v, keep) for k, v in self.state.items()}

    def close_prefill(self) -> None:
        """End of prefill: the policy's final update (if it asks for one), once."""
        if self.prefill_closed:
            return
        self.prefill_closed = True
        if self.policy.final_update and not self.frozen:
            self.run_update(final=True)

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last ``|tokens_to_remove|`` tokens (only those added since the last eviction)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}) is not supported; pass a negative count of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.n_pending:
            raise ValueError(
                f"cannot roll back {n} tokens: only {self.n_pending} were added since the last eviction"
            )
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.positions = self.positions[..., :-n]
        if self.valid is not None:
            self.valid = self.valid[..., :-n]
        self.seen -= n
        drop = n
        while drop > 0 and self.queries:
            last = self.queries[-1]
            if last.shape[2] <= drop:
                drop -= last.shape[2]
                self.queries.pop()
            else:
                self.queries[-1] = last[:, :, : last.shape[2] - drop]
                drop = 0

    def reset(self) -> None:
        super().reset()
        self.__init__(self.policy, self.layer_idx, self.owner)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise CacheConfigError("the NAMM cache serves one sequence at a time (num_beams/num_return_sequences = 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1:
            raise CacheConfigError("the NAMM cache serves one sequence at a time")

    def kv_bytes(self) -> int:
        if self.stored == 0:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gather ``x [B, H, S, ...]`` along the token axis 2 with ``keep [B, H, K]``."""
    idx = keep.reshape(*keep.shape, *([1] * (x.ndim - 3))).expand(*keep.shape, *x.shape[3:])
    return torch.gather(x, 2, idx)


def _decoder_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_signature(model) -> dict[str, Any]:
    """``{name, num_layers, num_kv_heads, num_q_heads, head_dim}`` of a transformers causal LM."""
    c = _decoder_config(model)
    num_q = c.num_attention_heads
    return {
        "name": getattr(c, "name_or_path", "") or getattr(model, "name_or_path", ""),
        "num_layers": c.num_hidden_layers,
        "num_kv_heads": getattr(c, "num_key_value_heads", None) or num_q,
        "num_q_heads": num_q,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // num_q,
    }


class NAMMCache(Cache):
    """``Cache(layers=[NAMMLayer, ...])`` for one model and one policy. Batch size 1, no padding."""

    def __init__(self, model, policy: TorchPolicy):
        config = _decoder_config(model)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise CacheConfigError(
                f"the NAMM cache supports full-attention layers only, this model has {sorted(set(layer_types))}; "
                "use a model without sliding-window or linear-attention layers"
            )
        policy.check_model(model)
        check_schedule(policy)
        self.policy = policy
        self.signature = model_signature(model)
        name = _attention.register()
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)
        self.peak_bytes = 0
        self.explicit_prefill = False  # set by generate.prefill: the caller ends the prefill (end_prefill)
        self.record_state = False      # layers keep their last update's state over every token (full_state)
        super().__init__(layers=[NAMMLayer(policy, i, self) for i in range(config.num_hidden_layers)])

    def fork(self, model, policy: TorchPolicy) -> "NAMMCache":
        """A new cache for ``model``, run by ``policy``, holding this cache's tokens, positions and policy state.

        Tensors are shared, not copied: cache operations (append, gather, crop) replace a layer's tensors
        and never write into them, so the two caches evolve independently.
        """
        new = NAMMCache(model, policy)
        for src, dst in zip(self.layers, new.layers):
            for key, value in vars(src).items():
                if key in ("policy", "_owner", "layer_idx"):
                    continue
                setattr(dst, key, list(value) if isinstance(value, list) else
                        dict(value) if isinstance(value, dict) else value)
        new.peak_bytes = self.peak_bytes
        return new

    def reselect(self, window: int | None = None, carried: list | None = None, upto: int | None = None) -> None:
        """One update of the policy on every layer over all stored tokens, as at the end of a prefill.

        For a cache just forked from a full one. By default every token counts as new (no policy state) and the
        attention rows are those of the queries the source buffered (``RecentQueries``), the last ``window`` of
        them when given. ``carried``: per layer, ``(state, n)``, a policy state over the first ``n`` tokens (the
        ``full_state`` a recording cache kept): those tokens are old, the policy's state for them carries over
        (the NAMM's EMA spectrogram, as between two of its own updates), and the rows are the buffered queries of
        tokens ``n ..``. ``upto`` first rolls the cache back to that many tokens (with ``carried``, the update
        then sees exactly the rows of tokens ``n .. upto - 1``)."""
        for i, layer in enumerate(self.layers):
            layer.prefill_closed, layer.frozen = True, False
            state, n_old = ({}, 0) if carried is None else carried[i]
            if upto is not None and not n_old <= upto <= layer.seen:
                raise ValueError(f"reselect: upto={upto} must lie between the {n_old} tokens the carried state "
                                 f"covers and the {layer.seen} the cache holds")
            layer.last_update_seen, layer.state = n_old, dict(state)
            if upto is not None:
                layer.crop(upto - layer.seen)
            if carried is None:
                if window:
                    layer._trim_queries(window)
            else:
                layer._trim_queries(layer.n_pending)
                have = sum(q.shape[2] for q in layer.queries)
                if have != layer.n_pending:
                    raise CacheConfigError(
                        f"reselect: the carried state covers {n_old} tokens, so the update needs the queries of the "
                        f"{layer.n_pending} after them; the source buffered {have}. Buffer more "
                        "(RecentQueries(window) with a larger window) or refresh more often")
            if self.policy.needs_attention and not layer.queries:
                raise CacheConfigError(
                    f"policy {self.policy.name!r} reads attention, but the source cache buffered no queries; "
                    "fork from a cache made with RecentQueries(window).make_cache(model)")
            layer.run_update(final=True)
        self.peak_bytes = self.kv_bytes()

    def track_bytes(self) -> None:
        """Record the peak of the physical K/V bytes (called after every append)."""
        self.peak_bytes = max(self.peak_bytes, self.kv_bytes())

    @property
    def chunk_size(self) -> int | None:
        return self.policy.chunk_size

    def end_prefill(self) -> None:
        """Run the policies' end-of-prefill update on every layer."""
        for layer in self.layers:
            layer.close_prefill()

    def freeze(self) -> None:
        """No more evictions: later tokens (e.g. the question, kvpress protocol) are never evicted."""
        for layer in self.layers:
            layer.close_prefill()
            layer.frozen = True
            layer.queries = []

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    def stored_tokens(self) -> list[int]:
        """Physical tokens per layer (ragged_max: the same count for every head of a layer)."""
        return [layer.stored for layer in self.layers]

    def kept_tokens(self) -> list[float]:
        """Mean truly kept tokens per head, per layer (differs from ``stored_tokens`` only in masked mode)."""
        out = []
        for layer in self.layers:
            if layer.valid is None:
                out.append(float(layer.stored))
            else:
                out.append(float(layer.valid.float().sum(-1).mean()))
        return out

    def kv_fraction(self) -> float:
        """Mean over layers of stored tokens / tokens seen."""
        seen = self.seen_tokens
        if seen == 0:
            return 1.0
        stored = self.stored_tokens()
        return sum(stored) / (len(stored) * seen)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)
