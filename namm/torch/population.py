"""A population of NAMM candidates evaluated together over one shared, prefilled cache.

Every candidate of a CMA-ES generation sees the same prompt, the same full-cache prefill and the same
token features; they differ only in their scoring network. Here the candidates stay batched from the
scores to the answer's logits:

- :func:`population_scores`: the scorer of ``P`` stacked parameter sets (``stack_params``) on one layer's
  shared features, ``[H, N, F] -> [P, H, N]``. BAM's ``Q K^T`` and ``A V`` are rewritten on the shared
  features: with ``q_i = x_i W_q + b_q`` and ``k_j = x_j W_k + b_k``, ``q_i . k_j = (x_i W_q W_k^T + b_q W_k^T)
  . x_j`` plus terms constant along ``j`` (which the softmax cancels), and since each attention row sums to
  one, ``A V = (A X) W_v + b_v``. The keys and values of the backward attention are then the features
  themselves (``F = 25`` wide, the same for every candidate), the queries ``x_i (W_q W_k^T) + b_q W_k^T`` per
  candidate, and one fused attention call per layer serves the whole population (the candidates as query
  heads of the one shared key/value head). Mathematically the scores of
  ``namm.torch.scoring.score_tokens``; numerically within fp32 rounding.
- :func:`select_population`: ``NAMMPolicy.select_tokens``' selection (threshold, budget cap, ragged max
  or masked) per candidate: ``keep [P, H, N]``.
- :class:`PopulationCache`: the shared prefilled keys and values, never copied or gathered, plus one keep
  mask per candidate and per KV head. A forward of ``input_ids [P, q]`` through it runs every candidate's
  answer at once: the registered ``"namm"`` attention (:meth:`PopulationLayer.attend`) scores the queries of
  all candidates against the shared keys in one matmul, adds ``-inf`` where a candidate evicted a slot, and
  appends each candidate's own keys and values of the new tokens (causal). Same logits as the candidate's
  own evicted ``NAMMCache`` within fp32 rounding (the kept slots are the same; sums run in another order).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from namm.config import NAMMConfig, SelectionConfig
from namm.torch import attention as _attention
from namm.torch import scoring, selection


def stack_params(flats, cfg: NAMMConfig) -> dict[str, torch.Tensor]:
    """Flat parameter vectors ``[P, D]`` -> ``{name: [P, *shape]}`` (float32)."""
    if not isinstance(flats, torch.Tensor):        # a writable copy: JAX hands over read-only arrays
        flats = np.array(flats, dtype=np.float32)
    flats = torch.as_tensor(flats, dtype=torch.float32)
    if flats.ndim != 2:
        raise ValueError(f"stack_params: expected a population [P, D], got shape {tuple(flats.shape)}")
    return {k: v.contiguous() for k, v in scoring.unflatten(flats, cfg).items()}


def _bias(params, name, shape_like):
    b = params.get(name)
    return b if b is not None else shape_like.new_zeros(shape_like.shape[0], shape_like.shape[-1])


def _padded(f: int) -> int:
    """Feature width the backward attention runs at: a multiple of 32 (zero columns, which change no logit and
    no used output). On the CPU measured the A X product with 25 output columns runs slower than with 32 and the
    Q X^T product about as fast, so the padding costs no time."""
    return -(-f // 32) * 32


def _backward_attention(qp: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``softmax_j(q_i . x_j + M_ij) x_j`` for every candidate: qp ``[H, P, N, F]`` (scaled), x ``[H, N, F]``
    -> ``[H, P, N, F]``; M the backward mask (``j >= i``, valid ``j``).

    One fused attention call (``scaled_dot_product_attention``: blocked GEMMs with an online softmax, no
    ``N x N`` logits in memory) per layer: the candidates are the query heads of one shared key/value head
    (``enable_gqa``), and the token order is reversed so that the backward mask is the causal one (whose
    upper blocks the kernel skips). Zero-padded feature columns leave the logits and the used outputs
    unchanged."""
    h, p, n, f = qp.shape
    keys = x.flip(1)[:, None]                                             # [H, 1, N, F], newest first
    mask = None
    if valid is not None:   # causal in the reversed order, and valid keys only
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None] & valid.flip(1)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qp.flip(2), keys, keys, attn_mask=mask,
                                                           is_causal=mask is None, scale=1.0, enable_gqa=True)
    return out.flip(2)


def population_scores(params: dict[str, torch.Tensor], cfg: NAMMConfig, feats: torch.Tensor,
                      valid: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scores of ``P`` stacked candidates (``stack_params``) on one layer's shared features.

    feats ``[H, N, F]`` (or ``[1, H, N, F]``), valid ``[H, N]`` (or ``[1, H, N]``) or None -> ``[P, H, N]``.
    BAM: the backward attention on the shared features (module docstring); MLP: token-wise, one batched
    matmul per layer over the population. ``dtype``: what the backward attention's two GEMMs and its softmax
    (nearly all of BAM's FLOPs) run in; ``torch.bfloat16`` uses the CPU's bf16 matrix units where it has them
    (AMX), the queries, the output projection and the accumulation stay fp32. Scores then differ from fp32 by
    bf16 rounding (8 significand bits), which can swap tokens near the selection threshold."""
    if feats.ndim == 4:
        if feats.shape[0] != 1:
            raise ValueError(f"population_scores: features of one sequence, got a batch of {feats.shape[0]}")
        feats = feats[0]
        valid = None if valid is None else valid[0]
    if feats.shape[-1] != cfg.feature_dim:
        raise ValueError(f"population_scores: features have {feats.shape[-1]} dims, config needs {cfg.feature_dim}")
    x = feats.float().contiguous()
    if valid is not None and bool(valid.all()):
        valid = None
    h, n, f = x.shape
    s = cfg.scorer
    if s.kind != "bam":
        hid = x.reshape(1, h * n, f)
        width = s.mlp_width or f
        for i in range(s.mlp_depth - 1):
            y = torch.matmul(hid, params[f"mlp.{i}.weight"])        # [P, H N, width]
            if f"mlp.{i}.bias" in params:
                y = y + params[f"mlp.{i}.bias"][:, None, :]
            y = torch.relu(y)
            hid = hid + y if (s.mlp_residual and hid.shape[-1] == width) else y
        out = torch.matmul(hid, params["head.weight"])[..., 0]     # [P, H N]
        if "head.bias" in params:
            out = out + params["head.bias"]
        return out.reshape(-1, h, n)
    nh, dh, hidden = s.num_heads, s.hidden // s.num_heads, s.hidden
    wqkv = params["bam.qkv.weight"]                                     # [P, F, 3 hidden]
    pop = wqkv.shape[0]
    bqkv = _bias(params, "bam.qkv.bias", wqkv)                          # [P, 3 hidden]
    wo, bo = params["bam.out.weight"], _bias(params, "bam.out.bias", params["bam.out.weight"])  # [P, hidden, 2F]
    w_head = params["head.weight"]                                      # [P, F, 1]
    b_head = params["head.bias"] if "head.bias" in params else w_head.new_zeros(pop, 1)
    xf = x.reshape(h * n, f)
    x_one = torch.cat([xf, xf.new_ones(h * n, 1)], 1)                  # [H N, F + 1]: the query bias as a column
    fp = _padded(f)
    xp = torch.nn.functional.pad(x, (0, fp - f)) if fp != f else x    # [H, N, fp]
    # s = H w + b_h with H = X (1 + g) + r and [r | g] = sum_e U_e B_e + b', B_e = W_v,e W_o,e, b' = b_v W_o + b_o:
    # s = x.w + b_h + r.w + g.(x * w). acc[..., 0] collects x.w + b_h + r.w, acc[..., 1:] is g.
    b_out = torch.bmm(bqkv[:, None, 2 * hidden:], wo) + bo[:, None]    # [P, 1, 2F] = b'
    acc = torch.empty(pop, h * n, 1 + f, dtype=torch.float32, device=x.device)
    acc[..., :1] = torch.matmul(xf, w_head) + (b_head + torch.bmm(b_out[..., :f], w_head)[:, 0])[:, None]
    acc[..., 1:] = b_out[..., f:]
    scale = dh ** -0.5
    for e in range(nh):
        cols = slice(e * dh, (e + 1) * dh)
        wq, wk = wqkv[:, :, cols], wqkv[:, :, hidden:][:, :, cols]
        wv = wqkv[:, :, 2 * hidden:][:, :, cols]
        wk_t = torch.nn.functional.pad(wk, (0, 0, 0, fp - f)).transpose(1, 2)  # [P, dh, fp]
        # [W_q W_k^T ; b_q W_k^T] / sqrt(d_h): [P, F + 1, fp]; queries of every candidate, token-major
        a_mat = torch.bmm(torch.cat([wq, bqkv[:, None, cols]], 1), wk_t) * scale
        qp = (x_one @ a_mat.permute(1, 0, 2).reshape(f + 1, pop * fp)).view(h, n, pop, fp).transpose(1, 2)
        u = _backward_attention(qp.to(dtype), xp.to(dtype), valid).float()  # [H, P, N, fp]
        b_mat = torch.bmm(wv, wo[:, cols])                               # [P, F, 2F]
        c_mat = torch.cat([torch.bmm(b_mat[..., :f], w_head), b_mat[..., f:]], 2)  # [P, F, 1 + F]
        c_mat = torch.nn.functional.pad(c_mat, (0, 0, 0, fp - f))       # [P, fp, 1 + F]
        acc.baddbmm_(u.transpose(0, 1).reshape(pop, h * n, fp), c_mat)
    g = acc[..., 1:].mul_(w_head.transpose(1, 2)).mul_(xf)              # g * w * x
    return (acc[..., 0] + g.sum(-1)).view(pop, h, n)


def select_population(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, seen: int,
                      sel: SelectionConfig, budget=None) -> torch.Tensor:
    """``NAMMPolicy.select_tokens``' keep mask for every candidate: scores ``[P, H, N]``, positions ``[H, N]``
    (or ``[1, H, N]``), valid likewise or None -> keep ``[P, H, N]`` bool (a ragged max per candidate)."""
    positions = positions.reshape(scores.shape[1:])
    valid_full = (torch.ones(positions.shape, dtype=torch.bool, device=positions.device) if valid is None
                  else valid.reshape(scores.shape[1:]))
    newest = selection.newest_mask(positions, valid_full)
    if budget is not None:
        from dataclasses import replace

        cap = selection.budget_tokens(budget, seen)
        sel = replace(sel, top_k=cap if sel.top_k is None else min(cap, sel.top_k))
    return selection.select(scores, valid_full, newest, sel, batch_dims=1)


# PyTorch's CPU flash-attention kernel, called directly for the log-sum-exp it returns beside its output
# (scaled_dot_product_attention drops it); None where this build lacks it (the unfused path then runs)
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class PopulationLayer(DynamicLayer):
    """One decoder layer of a :class:`PopulationCache`: the shared prefilled keys/values ``[1, Hkv, S, d]``,
    the candidates' keep mask ``[P, Hkv, S]`` (None: keep all) and their own appended keys/values."""

    is_croppable = False

    def __init__(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.shared_keys, self.shared_values = keys, values
        self.keep = keep
        # additive mask [Hkv, P, 1, S]: 0 on kept slots, -inf on evicted ones (an add runs faster than a
        # broadcast masked_fill over the query rows)
        self.bias = None if keep is None else torch.zeros(keep.transpose(0, 1)[:, :, None].shape,
                                                          dtype=keys.dtype, device=keys.device).masked_fill_(
            ~keep.transpose(0, 1)[:, :, None], float("-inf"))
        self.seen = keys.shape[-2]
        self.own_keys: torch.Tensor | None = None
        self.own_values: torch.Tensor | None = None
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the mask is built by attend(); this only sizes transformers' own

    def update(self, key_states, value_states, *args, **kwargs):
        """Append each candidate's ``[P, Hkv, q, d]`` keys/values; returns them (the shared part is held here)."""
        if self.keep is not None and key_states.shape[0] != self.keep.shape[0]:
            raise ValueError(f"population cache: a batch of {key_states.shape[0]} for {self.keep.shape[0]} "
                             "candidates; feed one row per candidate")
        if self.own_keys is None:
            self.own_keys, self.own_values = key_states, value_states
        else:
            self.own_keys = torch.cat([self.own_keys, key_states], dim=-2)
            self.own_values = torch.cat([self.own_values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        _attention.set_pending(self)
        return self.own_keys, self.own_values

    def _shared_part(self, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the scaled query rows ``qg [P, Hkv, G q, d]`` over the shared slots each candidate kept:
        (output ``[P, Hkv, G q, d]``, log-sum-exp of the logits ``[P, Hkv, G q]`` in fp32).

        On the CPU one fused flash-attention call per layer (blocked GEMMs, online softmax, its log-sum-exp
        returned), the rows ``(P, G q)`` of a KV head as one query sequence and the keep masks as an additive
        bias; elsewhere (or where that op is missing) logits, softmax and two GEMMs."""
        p, hkv, rows, d = qg.shape
        ks, vs = self.shared_keys, self.shared_values                 # [1, Hkv, S, d]
        s = ks.shape[-2]
        flat = qg.transpose(0, 1).reshape(1, hkv, p * rows, d)
        if _FUSED_CPU is not None and qg.device.type == "cpu":
            mask = None if self.bias is None else self.bias.expand(hkv, p, rows, s).reshape(1, hkv, p * rows, s)
            out, lse = _FUSED_CPU(flat, ks, vs, 0.0, False, attn_mask=mask, scale=1.0)
            return (out.view(hkv, p, rows, d).transpose(0, 1),
                    lse.view(hkv, p, rows).transpose(0, 1).float())
        ls = torch.matmul(flat[0], ks[0].transpose(1, 2)).view(hkv, p, rows, s)   # [Hkv, P, G q, S]
        if self.bias is not None:
            ls.add_(self.bias)
        # the log-sum-exp is max + log(sum) = max - log(max prob), in fp32 whatever the cache's dtype (in bf16 a
        # logit of 10 is only known to 0.06)
        ps = torch.softmax(ls, -1)
        lse = (ls.amax(-1).float() - ps.amax(-1).float().log()).transpose(0, 1)
        # rows (P, G q) of the shared part form one strided matrix per KV head: no copy
        out = torch.bmm(ps.view(hkv, p * rows, s), vs[0]).view(hkv, p, rows, d).transpose(0, 1)
        return out, lse

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query ``[P, Hq, q, d]`` (the newest ``q`` of the own tokens) -> ``[P, q, Hq, d]``: softmax over the
        shared slots the candidate kept and its own tokens up to the query (causal)."""
        p, hq, q, d = query.shape
        hkv = self.shared_keys.shape[1]
        g = hq // hkv
        ko, vo = self.own_keys, self.own_values                       # [P, Hkv, t, d]
        t = ko.shape[-2]
        qg = (query * scaling).reshape(p, hkv, g * q, d)              # rows (group, query)
        lo = torch.matmul(qg, ko.transpose(-1, -2))                  # [P, Hkv, G q, t]
        future = (torch.arange(t, device=query.device)[None, :]
                  > torch.arange(t - q, t, device=query.device)[:, None])  # [q, t]
        lo.view(p, hkv, g, q, t).masked_fill_(future, float("-inf"))
        # softmax over [shared slots | own tokens] as two softmaxes weighted by their log-sum-exps (no
        # concatenated copy of the shared keys, values or logits)
        out, lse_s = self._shared_part(qg)
        w_s = torch.sigmoid(lse_s - torch.logsumexp(lo.float(), -1))[..., None].to(query.dtype)  # shared share
        out = torch.lerp(torch.matmul(torch.softmax(lo, -1), vo), out, w_s)  # [P, Hkv, G q, d]
        return out.reshape(p, hkv, g, q, -1).permute(0, 3, 1, 2, 4).reshape(p, q, hq, -1)


class PopulationCache(Cache):
    """``Cache`` over a prefilled ``NAMMCache`` (every token stored) and per-candidate keep masks.

    keeps: per layer ``[P, Hkv, S]`` bool or None (keep all). ``model(input_ids [P, q], position_ids [P, q],
    past_key_values=cache)`` runs the ``P`` candidates' tokens in one forward; the model must use the
    ``"namm"`` attention backend (``register()``; a ``NAMMCache`` sets it). ``dtype``: the shared keys and
    values as the forward reads them (None: as stored); a bf16 model needs them in bf16."""

    def __init__(self, model, source, keeps, dtype: torch.dtype | None = None):
        name = _attention.register()
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)
        layers = []
        for i, (src, keep) in enumerate(zip(source.layers, keeps)):
            if src.valid is not None or src.stored != src.seen:
                raise ValueError("PopulationCache needs a source cache that kept every token it saw")
            keys, values = (src.keys, src.values) if dtype is None else (src.keys.to(dtype), src.values.to(dtype))
            layers.append(PopulationLayer(i, keys, values, keep))
        super().__init__(layers=layers)
