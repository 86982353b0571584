"""The draft: a Llama-architecture decoder in Flax (RMSNorm, RoPE, GQA attention, SwiGLU MLP).

One code path serves training (no cache, causal mask over the sequence) and sampling (a KV cache
written at each row's own positions, so right-padded prompts of different lengths share a batch):
a key at slot ``j`` is visible to a query at position ``i`` iff ``j <= i`` (Llama's causal rule).

Parameters are a plain pytree; ``params_from_hf`` / ``params_to_hf`` convert to and from Hugging
Face ``LlamaForCausalLM`` names (NumPy arrays), the only bridge to the torch side.

Reduced-vocabulary head: with a ``vocab_map`` ``[V']`` (the kept token ids, e.g. the most frequent
ones) the head is evaluated only on those rows and ``q`` is a softmax over the kept tokens; every
other token has proposal probability 0, which the rejection rule keeps lossless. The full head stays
in the parameters so that the Hugging Face export is a complete model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    vocab_size: int
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                             f"pick a divisor for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DraftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_target(cls, hf_config: Mapping, num_layers: int, **overrides) -> "DraftConfig":
        """Copy the target's geometry, vocabulary and RoPE theta from its HF ``config.json`` dict."""
        if hf_config.get("rope_scaling") not in (None, {}) and \
                (hf_config["rope_scaling"] or {}).get("rope_type", "default") != "default":
            raise ValueError(f"target rope_scaling={hf_config['rope_scaling']} is not supported by the draft; "
                             f"use a target with plain RoPE")
        theta = hf_config.get("rope_theta") or (hf_config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        heads = hf_config["num_attention_heads"]
        base = dict(vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
                    intermediate_size=hf_config["intermediate_size"], num_layers=num_layers, num_heads=heads,
                    num_kv_heads=hf_config.get("num_key_value_heads", heads),
                    head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
                    rope_theta=float(theta), rms_norm_eps=hf_config.get("rms_norm_eps", 1e-5),
                    max_position_embeddings=hf_config.get("max_position_embeddings", 8192),
                    bos_token_id=hf_config.get("bos_token_id"), eos_token_id=hf_config.get("eos_token_id"))
        base.update(overrides)
        return cls(**base)


# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(cfg: DraftConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random initialisation (normal(0, std) matrices, unit norms)."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    keys = iter(jax.random.split(key, 2 + 7 * cfg.num_layers))
    normal = lambda shape: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    layers = [dict(attn_norm=jnp.ones(d), q=normal((d, h * hd)), k=normal((d, kv * hd)), v=normal((d, kv * hd)),
                   o=normal((h * hd, d)), mlp_norm=jnp.ones(d), gate=normal((d, f)), up=normal((d, f)),
                   down=normal((f, d)))
              for _ in range(cfg.num_layers)]
    return dict(embed=normal((cfg.vocab_size, d)), layers=layers, norm=jnp.ones(d), head=normal((d, cfg.vocab_size)))


_LAYER_NAMES = {  # ours -> HF (torch Linear weights are [out, in]; ours are [in, out])
    "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}


def params_from_hf(state: Mapping[str, np.ndarray], cfg: DraftConfig, layers: list[int] | None = None) -> Params:
    """Draft params from a target's HF state dict (NumPy): embeddings, output head, the given layers
    (default: the first ``cfg.num_layers``) and the final norm. A tied head reuses the embeddings."""
    layers = list(range(cfg.num_layers)) if layers is None else list(layers)
    if len(layers) != cfg.num_layers:
        raise ValueError(f"{len(layers)} target layers given for a draft of {cfg.num_layers} layers")
    emb = np.asarray(state["model.embed_tokens.weight"], np.float32)
    if emb.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"target embeddings are {emb.shape}, draft expects {(cfg.vocab_size, cfg.hidden_size)}; "
                         f"build the DraftConfig with DraftConfig.from_target(target_config, ...)")
    head = np.asarray(state.get("lm_head.weight", emb), np.float32)
    out = dict(embed=jnp.asarray(emb), norm=jnp.asarray(state["model.norm.weight"], jnp.float32),
               head=jnp.asarray(head.T), layers=[])
    for i in layers:
        layer = {}
        for ours, theirs in _LAYER_NAMES.items():
            w = np.asarray(state[f"model.layers.{i}.{theirs}"], np.float32)
            layer[ours] = jnp.asarray(w if w.ndim == 1 else w.T)
        out["layers"].append(layer)
    return out


def params_to_hf(params: Params) -> dict[str, np.ndarray]:
    """HF ``LlamaForCausalLM`` state dict (NumPy fp32, untied head) from draft params."""
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["norm"], np.float32),
           "lm_head.weight": np.ascontiguousarray(np.asarray(params["head"], np.float32).T)}
    for i, layer in enumerate(params["layers"]):
        for ours, theirs in _LAYER_NAMES.items():
            w = np.asarray(layer[ours], np.float32)
            out[f"model.layers.{i}.{theirs}"] = np.ascontiguousarray(w if w.ndim == 1 else w.T)
    return out


# ----------------------------------------------------------------------------------------------
# Forward


def rms_norm(x, w, eps):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * w, computed in fp32."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """RoPE (rotate-half form, as HF Llama). x [B, T, H, hd], positions [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))    # [hd/2]
    ang = positions[..., None].astype(jnp.float32) * inv_freq                     # [B, T, hd/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def _attention(cfg: DraftConfig, p, x, positions, cache):
    """x [B, T, D]; cache None or (k [B, L, KV, hd], v [B, L, KV, hd]) written at ``positions``."""
    b, t, _ = x.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = rope((x @ p["q"]).reshape(b, t, h, hd), positions, cfg.rope_theta)
    k = rope((x @ p["k"]).reshape(b, t, kv, hd), positions, cfg.rope_theta)
    v = (x @ p["v"]).reshape(b, t, kv, hd)
    if cache is None:
        kpos = positions                                                          # [B, T]
    else:
        rows = jnp.arange(b)[:, None]
        k = cache[0].at[rows, positions].set(k)
        v = cache[1].at[rows, positions].set(v)
        cache = (k, v)
        kpos = jnp.broadcast_to(jnp.arange(k.shape[1]), (b, k.shape[1]))         # [B, L]
    q = q.reshape(b, t, kv, h // kv, hd)                                          # GQA groups
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * hd ** -0.5                        # [B, KV, G, T, S]
    visible = kpos[:, None, :] <= positions[:, :, None]                           # [B, T, S]
    s = jnp.where(visible[:, None, None], s, jnp.finfo(s.dtype).min)
    a = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(b, t, h * hd)
    return o @ p["o"], cache


def hidden_states(cfg: DraftConfig, params: Params, ids, positions, cache=None):
    """Final-normed hidden states ``[B, T, D]`` (and the updated cache list, or None)."""
    x = params["embed"][ids]
    new_cache = [] if cache is not None else None
    for i, p in enumerate(params["layers"]):
        a, c = _attention(cfg, p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), positions,
                          None if cache is None else cache[i])
        x = x + a
        y = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(y @ p["gate"]) * (y @ p["up"])) @ p["down"]          # SwiGLU
        if new_cache is not None:
            new_cache.append(c)
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), new_cache


def head_logits(params: Params, h, vocab_map=None):
    """Logits over the full vocabulary ``[..., V]`` or over the kept tokens ``[..., V']``."""
    w = params["head"] if vocab_map is None else params["head"][:, vocab_map]
    return h @ w


def forward(cfg: DraftConfig, params: Params, ids, positions=None, cache=None, vocab_map=None):
    """Logits ``[B, T, V or V']`` for ``ids [B, T]`` at ``positions [B, T]`` (default 0..T-1)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h, cache = hidden_states(cfg, params, ids, positions, cache)
    return head_logits(params, h, vocab_map), cache


def init_cache(cfg: DraftConfig, batch: int, length: int):
    z = jnp.zeros((batch, length, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    return [(z, z) for _ in range(cfg.num_layers)]


# ----------------------------------------------------------------------------------------------
# Sampling (on-policy data): right-padded prompts, each row continues from its own length


@functools.partial(jax.jit, static_argnums=(0, 4))
def sample(cfg: DraftConfig, params: Params, prompts, lengths, new_tokens: int, key, temperature=1.0,
           vocab_map=None):
    """Sample ``new_tokens`` per row. prompts [B, P] right-padded, lengths [B] -> tokens [B, new_tokens].

    temperature 0 is greedy. Tokens come back as full-vocabulary ids (mapped through ``vocab_map``).
    """
    b, p = prompts.shape
    cache = init_cache(cfg, b, p + new_tokens)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    h, cache = hidden_states(cfg, params, prompts, positions, cache)
    last = h[jnp.arange(b), lengths - 1]                                           # [B, D]

    def pick(h_last, k):
        logits = head_logits(params, h_last, vocab_map)
        greedy = jnp.argmax(logits, -1)
        drawn = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6), -1)
        tok = jnp.where(temperature > 0, drawn, greedy)
        return tok if vocab_map is None else vocab_map[tok]

    def step(carry, k):
        h_last, cache, pos = carry
        tok = pick(h_last, k)
        h_new, cache = hidden_states(cfg, params, tok[:, None], pos[:, None], cache)
        return (h_new[:, 0], cache, pos + 1), tok

    _, toks = jax.lax.scan(step, (last, cache, lengths), jax.random.split(key, new_tokens))
    return toks.T
