"""NAMM scoring networks (reference section 3): BAM and the token-wise MLP ablation, in Flax.

One parameter vector is shared by every layer and head; it is the CMA-ES search space. Its flat
layout (``param_layout``) follows the official packing: per linear layer a row-major weight
``[in, out]`` then its bias, modules in order. For the paper's BAM:

    bam.qkv.weight (25, 96)   columns 0-31 Q, 32-63 K, 64-95 V (head h: columns h*d_h:(h+1)*d_h of each)
    bam.qkv.bias   (96,)
    bam.out.weight (32, 50)   output columns 0-24 the additive part r, 25-49 the gate g
    bam.out.bias   (50,)
    head.weight    (25, 1)
    head.bias      (1,)       -> 4,172 values

Linear maps are ``x @ W + b``. The named dict (``unflatten``) is the interchange format with the
PyTorch runtime. All-zero parameters give score 0 for every token (so every token is kept).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from namm.config import NAMMConfig

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


def backward_mask(valid: Array, order: Array | None = None) -> Array:
    """Counter-causal mask ``[..., N] -> [..., N(query i), N(key j)]``: i attends to valid j with order_j >= order_i.

    ``order`` is the chronological order of the tokens (absolute positions; default the index).
    Built per row from that row's own validity (the official code broadcasts one padding mask across
    batch rows, wrong for batch > 1 with different lengths; here every row/head has its own mask).
    """
    n = valid.shape[-1]
    if order is None:
        order = jnp.broadcast_to(jnp.arange(n), valid.shape)
    return valid[..., None, :] & (order[..., None, :] >= order[..., :, None])


def _attend(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """softmax(scale q k^T + M) v, heads-major: q ``[..., nh, n, d]``, k ``[..., nh, m, d]``, v ``[..., nh, m, dv]``,
    mask ``[..., n, m]`` -> ``[..., nh, n, dv]`` (a query with no allowed key gets 0)."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k, precision=_HI) * scale                  # [..., nh, n, m]
    logits = jnp.where(mask[..., None, :, :], logits, -jnp.inf)                              # M: -inf off-mask
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))                                 # unnormalised softmax
    z = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", e, v, precision=_HI)                               # [..., nh, n, dv]
    return o / jnp.where(z > 0, z, 1.0)


def backward_attention(q: Array, k: Array, v: Array, valid: Array, order: Array | None = None,
                       block_size: int | None = 128, scale: float | None = None) -> Array:
    """Attention of each token over itself and the newer valid tokens: ``[..., N, nh, d]`` -> ``[..., N, nh, dv]``.

    ``scale`` defaults to 1 / sqrt(d). Dense for N <= block_size. Otherwise the tokens are sorted
    chronologically (by ``order``; valid tokens must have distinct orders) and queries are processed
    in blocks of ``block_size`` that only look at key blocks at or after their own: about half the
    work and memory of the dense N x N computation, exactly the same result.
    """
    n = q.shape[-3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    heads_major = lambda z: jnp.swapaxes(z, -3, -2)                      # [..., N, nh, d] <-> [..., nh, N, d]
    if block_size is None or n <= block_size:
        return heads_major(_attend(heads_major(q), heads_major(k), heads_major(v), backward_mask(valid, order), scale))
    key = jnp.broadcast_to(jnp.arange(n), valid.shape) if order is None else order
    key = jnp.where(valid, key, jnp.iinfo(jnp.int32).max)
    perm = jnp.argsort(key, axis=-1, stable=True)                        # chronological, invalid last
    gather = lambda z: heads_major(jnp.take_along_axis(z, perm[..., None, None], axis=-3))
    qs, ks, vs = gather(q), gather(k), gather(v)                         # [..., nh, N, d]
    vals = jnp.take_along_axis(valid, perm, axis=-1)
    outs = []
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        qi = jnp.arange(start, stop)[:, None]
        kj = jnp.arange(start, n)[None, :]
        mask = vals[..., None, start:] & (kj >= qi)                      # [..., b, n - start]
        outs.append(_attend(qs[..., start:stop, :], ks[..., start:, :], vs[..., start:, :], mask, scale))
    o = heads_major(jnp.concatenate(outs, axis=-2))                      # [..., N, nh, dv], sorted
    inv = jnp.argsort(perm, axis=-1)                                     # back to slot order
    return jnp.take_along_axis(o, inv[..., None, None], axis=-3)


class BAM(nn.Module):
    """Backward Attention Memory: s = head(X * (1 + g) + r), [r | g] = out(softmax(QK^T/sqrt(d_h) + M) V).

    x ``[..., N, F]``, valid ``[..., N]``, order ``[..., N]`` (positions; default index) -> scores ``[..., N]``.
    ``block_size`` only changes how the backward attention is computed (see ``backward_attention``).
    """

    hidden: int = 32
    num_heads: int = 1
    bias: bool = True
    block_size: int | None = 128

    @nn.compact
    def __call__(self, x: Array, valid: Array, order: Array | None = None) -> Array:
        f = x.shape[-1]
        nh, dh = self.num_heads, self.hidden // self.num_heads
        qkv = nn.Dense(3 * self.hidden, use_bias=self.bias, name="qkv", precision=_HI)(x)   # [..., N, 3*hidden]
        split = lambda z: z.reshape(z.shape[:-1] + (nh, dh))                                # [..., N, nh, dh]
        q, k, v = (split(qkv[..., i * self.hidden:(i + 1) * self.hidden]) for i in range(3))
        o = backward_attention(q, k, v, valid, order, self.block_size, 1.0 / math.sqrt(dh))  # A V
        o = o.reshape(o.shape[:-2] + (self.hidden,))                                        # [..., N, hidden]
        y = nn.Dense(2 * f, use_bias=self.bias, name="out", precision=_HI)(o)               # [..., N, 2F]
        r, g = y[..., :f], y[..., f:]
        h = x * (1.0 + g) + r                                                               # H = X (1 + g) + r
        return nn.Dense(1, use_bias=self.bias, name="head", precision=_HI)(h)[..., 0]      # s = H w + b


class MLPScorer(nn.Module):
    """Token-wise MLP: ``depth - 1`` hidden ReLU layers of ``width`` (residual if asked), then a linear head.

    x ``[..., N, F]`` -> scores ``[..., N]`` (``valid``/``order`` accepted for interface parity; unused).
    """

    depth: int = 1
    width: int | None = None
    bias: bool = False
    residual: bool = False

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None, order: Array | None = None) -> Array:
        h = x
        width = self.width or x.shape[-1]
        for i in range(self.depth - 1):
            y = nn.relu(nn.Dense(width, use_bias=self.bias, name=f"mlp_{i}", precision=_HI)(h))
            # Correct semantics (the official deep MLP applies the nonlinearity to the wrong tensor).
            h = h + y if (self.residual and h.shape[-1] == width) else y
        return nn.Dense(1, use_bias=self.bias, name="head", precision=_HI)(h)[..., 0]


def make_module(cfg: NAMMConfig) -> nn.Module:
    s = cfg.scorer
    if s.kind == "bam":
        return BAM(hidden=s.hidden, num_heads=s.num_heads, bias=s.bias)
    return MLPScorer(depth=s.mlp_depth, width=s.mlp_width, bias=s.mlp_bias, residual=s.mlp_residual)


# --------------------------------------------------------------------------------------------
# Flat parameter vector <-> named dict <-> Flax tree
# --------------------------------------------------------------------------------------------

def _layers(cfg: NAMMConfig) -> list[tuple[str, str, int, int, bool]]:
    """(exported prefix, flax name, in, out, bias) per linear layer, in packing order."""
    s, f = cfg.scorer, cfg.feature_dim
    if s.kind == "bam":
        return [("bam.qkv", "qkv", f, 3 * s.hidden, s.bias), ("bam.out", "out", s.hidden, 2 * f, s.bias),
                ("head", "head", f, 1, s.bias)]
    width = s.mlp_width or f
    out, d_in = [], f
    for i in range(s.mlp_depth - 1):
        out.append((f"mlp.{i}", f"mlp_{i}", d_in, width, s.mlp_bias))
        d_in = width
    out.append(("head", "head", d_in, 1, s.mlp_bias))
    return out


def param_layout(cfg: NAMMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The flat vector's layout in order: [(name, shape)], weights [in, out] then biases."""
    layout = []
    for prefix, _, d_in, d_out, bias in _layers(cfg):
        layout.append((f"{prefix}.weight", (d_in, d_out)))
        if bias:
            layout.append((f"{prefix}.bias", (d_out,)))
    return layout


def num_params(cfg: NAMMConfig) -> int:
    """Length of the flat parameter vector (4,172 for the paper's BAM)."""
    return int(sum(np.prod(shape) for _, shape in param_layout(cfg)))


def zeros(cfg: NAMMConfig) -> Array:
    """The paper's initialisation (all zeros: every token scores 0 and is kept)."""
    return jnp.zeros((num_params(cfg),), jnp.float32)


def unflatten(flat: Array, cfg: NAMMConfig) -> dict[str, Array]:
    """Flat vector ``[P]`` -> ``{name: array}`` in layout order."""
    n = num_params(cfg)
    if flat.shape[-1] != n:
        raise ValueError(f"unflatten: parameter vector has {flat.shape[-1]} values, the "
                         f"{cfg.scorer.kind} scorer config needs {n}")
    out, i = {}, 0
    for name, shape in param_layout(cfg):
        size = int(np.prod(shape))
        out[name] = flat[..., i:i + size].reshape(flat.shape[:-1] + shape)
        i += size
    return out


def flatten(named: Mapping[str, Array], cfg: NAMMConfig | None = None) -> Array:
    """``{name: array}`` -> flat vector, in ``param_layout(cfg)`` order (dict order if cfg is None)."""
    if cfg is None:
        names = list(named)
    else:
        names = [n for n, _ in param_layout(cfg)]
        missing = sorted(set(names) - set(named))
        extra = sorted(set(named) - set(names))
        if missing or extra:
            raise ValueError(f"flatten: parameter names do not match the config (missing {missing}, unexpected {extra})")
        for n, shape in param_layout(cfg):
            if tuple(np.shape(named[n])) != shape:
                raise ValueError(f"flatten: {n} has shape {tuple(np.shape(named[n]))}, config needs {shape}")
    return jnp.concatenate([jnp.ravel(jnp.asarray(named[n], jnp.float32)) for n in names])


def widen_features(flat, cfg_from: NAMMConfig, cfg_to: NAMMConfig) -> np.ndarray:
    """Parameters of ``cfg_from`` as parameters of ``cfg_to``, whose features are ``cfg_from``'s plus appended ones
    (``features.pool_kernel`` switched on): the weights of the new inputs (and, in BAM, of the new additive and
    gate outputs) are zero, so every token scores exactly as before. Flat ``[P_from]`` -> ``[P_to]`` (numpy)."""
    f0, f1 = cfg_from.feature_dim, cfg_to.feature_dim
    same = cfg_from.scorer == cfg_to.scorer and replace(cfg_from.features, pool_kernel=0) == replace(
        cfg_to.features, pool_kernel=0)
    if not same or f1 < f0:
        raise ValueError("widen_features: the configs must differ only in features.pool_kernel (off -> on)")
    if cfg_to.scorer.kind == "mlp" and cfg_to.scorer.mlp_depth > 1 and cfg_to.scorer.mlp_width is None:
        raise ValueError("widen_features: an MLP whose hidden width follows the feature size cannot be widened; "
                         "set scorer.mlp_width")
    old = {k: np.asarray(v, np.float32) for k, v in unflatten(jnp.asarray(flat, jnp.float32), cfg_from).items()}
    new = {}
    for name, shape in param_layout(cfg_to):
        w, o = np.zeros(shape, np.float32), old[name]
        if name.startswith("bam.out."):      # output columns [r (F) | g (F)]: each block keeps its first f0
            w[..., :f0], w[..., f1:f1 + f0] = o[..., :f0], o[..., f0:]
        else:                                # input rows (weights of the first layers), or unchanged shapes
            w[tuple(slice(0, d) for d in o.shape)] = o
        new[name] = w
    return np.asarray(flatten(new, cfg_to), np.float32)


def to_flax(named: Mapping[str, Array], cfg: NAMMConfig) -> dict:
    """Named dict -> Flax variables ``{"params": {layer: {"kernel", "bias"}}}``."""
    params = {}
    for prefix, flax_name, _, _, bias in _layers(cfg):
        params[flax_name] = {"kernel": named[f"{prefix}.weight"]}
        if bias:
            params[flax_name]["bias"] = named[f"{prefix}.bias"]
    return {"params": params}


def from_flax(variables: Mapping, cfg: NAMMConfig) -> dict[str, Array]:
    """Flax variables -> named dict (inverse of ``to_flax``)."""
    p = variables["params"] if "params" in variables else variables
    named = {}
    for prefix, flax_name, _, _, bias in _layers(cfg):
        named[f"{prefix}.weight"] = p[flax_name]["kernel"]
        if bias:
            named[f"{prefix}.bias"] = p[flax_name]["bias"]
    return named


@functools.partial(jax.jit, static_argnums=1)
def _score_tokens(flat_params, cfg, features, valid, order):
    variables = to_flax(unflatten(flat_params, cfg), cfg)
    return make_module(cfg).apply(variables, features.astype(jnp.float32), valid, order)


def score_tokens(flat_params: Array, cfg: NAMMConfig, features: Array, valid: Array,
                 order: Array | None = None) -> Array:
    """Score every token: flat ``[P]``, features ``[H, N, F]``, valid ``[H, N]`` -> scores ``[H, N]``.

    BAM's backward mask lets token i attend to valid tokens j with order_j >= order_i (``order`` =
    absolute positions ``[H, N]``; default the slot index, i.e. slots in chronological order).
    Scores of invalid tokens are meaningless (selection drops them).
    """
    if features.shape[-1] != cfg.feature_dim:
        raise ValueError(f"score_tokens: features have {features.shape[-1]} dims, config needs {cfg.feature_dim}")
    n = num_params(cfg)
    if flat_params.shape[-1] != n:
        raise ValueError(f"score_tokens: parameter vector has {flat_params.shape[-1]} values, the "
                         f"{cfg.scorer.kind} scorer config needs {n}")
    return _score_tokens(flat_params, cfg, features, jnp.asarray(valid, bool), order)
