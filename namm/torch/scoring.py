"""NAMM scorers in PyTorch, mirroring ``namm.scoring`` (reference section 3).

Parameters are the named dict of ``namm.scoring.param_layout`` ("bam.qkv.weight" [25, 96], ...),
applied as ``x @ W + b``. Shared parameters have exactly those shapes; per-head parameters carry a
leading ``[H]`` axis (one set per KV head) and are applied head by head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from namm.config import NAMMConfig


def param_layout(cfg: NAMMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` in flat-vector order; the same names and shapes as ``namm.scoring.param_layout``."""
    s, f = cfg.scorer, cfg.feature_dim
    if s.kind == "bam":
        layers = [("bam.qkv", f, 3 * s.hidden, s.bias), ("bam.out", s.hidden, 2 * f, s.bias), ("head", f, 1, s.bias)]
    else:
        width, d_in, layers = s.mlp_width or f, f, []
        for i in range(s.mlp_depth - 1):
            layers.append((f"mlp.{i}", d_in, width, s.mlp_bias))
            d_in = width
        layers.append(("head", d_in, 1, s.mlp_bias))
    out = []
    for prefix, d_in, d_out, bias in layers:
        out.append((f"{prefix}.weight", (d_in, d_out)))
        if bias:
            out.append((f"{prefix}.bias", (d_out,)))
    return out


def num_params(cfg: NAMMConfig) -> int:
    return sum(math.prod(shape) for _, shape in param_layout(cfg))


def unflatten(flat: torch.Tensor, cfg: NAMMConfig) -> dict[str, torch.Tensor]:
    """Flat ``[..., P]`` -> ``{name: [..., *shape]}``."""
    n = num_params(cfg)
    if flat.shape[-1] != n:
        raise ValueError(f"unflatten: {flat.shape[-1]} values, the {cfg.scorer.kind} scorer config needs {n}")
    out, i = {}, 0
    for name, shape in param_layout(cfg):
        size = math.prod(shape)
        out[name] = flat[..., i : i + size].reshape(*flat.shape[:-1], *shape)
        i += size
    return out


def _linear(x: torch.Tensor, params: dict, prefix: str) -> torch.Tensor:
    """``x [..., H, N, in] @ W + b``; W ``[in, out]`` (shared) or ``[H, in, out]`` (per head)."""
    w = params[f"{prefix}.weight"]
    b = params.get(f"{prefix}.bias")
    if w.ndim == 2:
        y = x @ w
        return y if b is None else y + b
    y = torch.einsum("...hni,hio->...hno", x, w)
    return y if b is None else y + b[:, None, :]


def bam_scores(x: torch.Tensor, params: dict, cfg: NAMMConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """BAM: s = head(X (1 + g) + r), [r | g] = out(softmax(Q K^T / sqrt(d_h) + M) V).

    x ``[..., H, N, F]`` in chronological slot order, valid ``[..., H, N]`` or None -> ``[..., H, N]``.
    M is the backward mask: token i attends to valid tokens j >= i (itself and newer tokens).
    """
    s = cfg.scorer
    f = x.shape[-1]
    nh, dh = s.num_heads, s.hidden // s.num_heads
    qkv = _linear(x, params, "bam.qkv")  # [..., H, N, 3*hidden]

    def heads(z):  # [..., H, N, hidden] -> [..., H, nh, N, dh]
        return z.reshape(*z.shape[:-1], nh, dh).transpose(-2, -3)

    q, k, v = (heads(qkv[..., i * s.hidden : (i + 1) * s.hidden]) for i in range(3))
    n = x.shape[-2]
    lead = q.shape[:-3]

    def flat4(z):  # 4-D inputs let SDPA use its fused kernels: [prod(lead), nh, N, dh]
        return z.reshape(-1, nh, n, dh)

    if valid is None or bool(valid.all()):
        # j >= i is causal in reversed order: flip the tokens, run causal SDPA, flip back
        o = F.scaled_dot_product_attention(
            flat4(q.flip(-2)), flat4(k.flip(-2)), flat4(v.flip(-2)), is_causal=True
        ).flip(-2)
    else:
        idx = torch.arange(n, device=x.device)
        mask = (idx[None, :] >= idx[:, None]) & valid.reshape(-1, 1, 1, n)  # [prod(lead), 1, N, N]
        o = F.scaled_dot_product_attention(flat4(q), flat4(k), flat4(v), attn_mask=mask)
    o = o.reshape(*lead, nh, n, dh).transpose(-2, -3).reshape(*x.shape[:-1], s.hidden)  # [..., H, N, hidden]
    y = _linear(o, params, "bam.out")  # [..., H, N, 2F]
    r, g = y[..., :f], y[..., f:]
    h = x * (1.0 + g) + r  # H = X (1 + g) + r
    return _linear(h, params, "head")[..., 0]  # s = H w + b


def mlp_scores(x: torch.Tensor, params: dict, cfg: NAMMConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token-wise MLP: ``depth - 1`` hidden ReLU layers (residual when widths match and asked), linear head."""
    s = cfg.scorer
    h = x
    width = s.mlp_width or x.shape[-1]
    for i in range(s.mlp_depth - 1):
        y = torch.relu(_linear(h, params, f"mlp.{i}"))
        h = h + y if (s.mlp_residual and h.shape[-1] == width) else y
    return _linear(h, params, "head")[..., 0]


def score_tokens(params: dict, cfg: NAMMConfig, features: torch.Tensor, valid: torch.Tensor | None = None):
    """features ``[..., H, N, F]``, valid ``[..., H, N]`` -> scores ``[..., H, N]`` (float32)."""
    if features.shape[-1] != cfg.feature_dim:
        raise ValueError(f"score_tokens: features have {features.shape[-1]} dims, config needs {cfg.feature_dim}")
    fn = bam_scores if cfg.scorer.kind == "bam" else mlp_scores
    return fn(features.float(), params, cfg, valid)
