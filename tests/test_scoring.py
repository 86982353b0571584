"""BAM and MLP scorers against a NumPy forward written from the reference (section 3)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from namm import scoring
from namm.config import ConfigError, NAMMConfig, ScorerConfig

from conftest import EPS32, bam_score_atol

CFG = NAMMConfig()
RNG = np.random.default_rng(1)


def np_bam(named, x, valid, order=None, num_heads=1):
    """[H, N, F] -> [H, N]: softmax(QK^T/sqrt(d_h) + M) V, [r|g] = O W_o + b_o, H = X(1+g)+r, s = H w + b."""
    p = {k: np.asarray(v, np.float64) for k, v in named.items()}
    x = x.astype(np.float64)
    hidden = p["bam.out.weight"].shape[0]
    dh = hidden // num_heads
    qkv = x @ p["bam.qkv.weight"] + p["bam.qkv.bias"]
    q, k, v = qkv[..., :hidden], qkv[..., hidden:2 * hidden], qkv[..., 2 * hidden:]
    N = x.shape[-2]
    order = np.broadcast_to(np.arange(N), valid.shape) if order is None else order
    out = np.zeros(x.shape[:-1] + (hidden,))
    for h in range(x.shape[0]):
        for i in range(N):
            allowed = [j for j in range(N) if valid[h, j] and order[h, j] >= order[h, i]]
            for a in range(num_heads):
                sl = slice(a * dh, (a + 1) * dh)
                if not allowed:
                    continue
                lg = np.array([q[h, i, sl] @ k[h, j, sl] for j in allowed]) / np.sqrt(dh)
                w = np.exp(lg - lg.max())
                w /= w.sum()
                out[h, i, sl] = sum(wj * v[h, j, sl] for wj, j in zip(w, allowed))
    y = out @ p["bam.out.weight"] + p["bam.out.bias"]
    f = x.shape[-1]
    hh = x * (1 + y[..., f:]) + y[..., :f]
    return (hh @ p["head.weight"] + p["head.bias"])[..., 0]


def random_params(cfg, scale=0.2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, scale, scoring.num_params(cfg)), jnp.float32)


def test_param_count_and_layout():
    assert scoring.num_params(CFG) == 4172
    assert scoring.param_layout(CFG) == [
        ("bam.qkv.weight", (25, 96)), ("bam.qkv.bias", (96,)), ("bam.out.weight", (32, 50)),
        ("bam.out.bias", (50,)), ("head.weight", (25, 1)), ("head.bias", (1,))]
    small = NAMMConfig(scorer=ScorerConfig(hidden=16, bias=False))      # base_bam defaults
    assert scoring.num_params(small) == 1200 + 800 + 25
    mlp = NAMMConfig(scorer=ScorerConfig(kind="mlp"))                     # official MLP: 25 -> 1, no bias
    assert scoring.num_params(mlp) == 25


def test_flatten_unflatten_roundtrip_and_row_major():
    flat = jnp.arange(4172, dtype=jnp.float32)
    named = scoring.unflatten(flat, CFG)
    assert named["bam.qkv.weight"][0, 1] == 1 and named["bam.qkv.weight"][1, 0] == 96   # row-major [in, out]
    assert named["bam.qkv.bias"][0] == 25 * 96
    np.testing.assert_array_equal(scoring.flatten(named), flat)
    shuffled = dict(sorted(named.items()))                               # e.g. as read from safetensors
    np.testing.assert_array_equal(scoring.flatten(shuffled, CFG), flat)
    with pytest.raises(ValueError, match="needs 4172"):
        scoring.unflatten(jnp.zeros(10), CFG)
    with pytest.raises(ValueError, match="missing"):
        scoring.flatten({"head.weight": jnp.zeros((25, 1))}, CFG)


def test_bam_matches_numpy_forward():
    x = RNG.normal(size=(2, 7, 25)).astype(np.float32)
    valid = np.ones((2, 7), bool)
    valid[1, 2] = False
    flat = random_params(CFG)
    got = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x), jnp.asarray(valid)))
    want = np_bam(scoring.unflatten(flat, CFG), x, valid)
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=bam_score_atol(want[valid], 7))  # fp32 vs fp64


def test_bam_multihead_matches_numpy():
    cfg = NAMMConfig(scorer=ScorerConfig(hidden=32, num_heads=4))
    x = RNG.normal(size=(1, 6, 25)).astype(np.float32)
    valid = np.ones((1, 6), bool)
    flat = random_params(cfg, seed=3)
    got = np.asarray(scoring.score_tokens(flat, cfg, jnp.asarray(x), jnp.asarray(valid)))
    want = np_bam(scoring.unflatten(flat, cfg), x, valid, num_heads=4)
    np.testing.assert_allclose(got, want, rtol=0, atol=bam_score_atol(want, 6))  # fp32 vs fp64; d_h = 8 < 32: covered


def test_backward_mask_newer_affects_older_never_reverse():
    x = RNG.normal(size=(1, 6, 25)).astype(np.float32)
    valid = jnp.ones((1, 6), bool)
    flat = random_params(CFG, scale=0.3)
    base = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x), valid))
    x2 = x.copy()
    x2[0, 4] += 1.0                                                      # change token 4
    moved = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x2), valid))
    assert np.all(np.abs(moved[0, :5] - base[0, :5]) > 1e-6)             # itself and every older token change
    np.testing.assert_array_equal(moved[0, 5], base[0, 5])              # the newer token does not
    # Padding never influences valid tokens.
    vmask = np.ones((1, 6), bool)
    vmask[0, 3] = False
    a = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x), jnp.asarray(vmask)))
    x3 = x.copy()
    x3[0, 3] = 100.0
    c = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x3), jnp.asarray(vmask)))
    np.testing.assert_array_equal(a[vmask], c[vmask])


def test_order_uses_positions_not_slots():
    x = RNG.normal(size=(1, 5, 25)).astype(np.float32)
    valid = jnp.ones((1, 5), bool)
    flat = random_params(CFG, seed=5)
    base = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x), valid))
    perm = np.array([3, 0, 4, 1, 2])                                     # slots hold tokens out of order
    got = np.asarray(scoring.score_tokens(flat, CFG, jnp.asarray(x[:, perm]), valid, order=jnp.asarray(perm[None])))
    np.testing.assert_allclose(got[0], base[0, perm], rtol=0, atol=bam_score_atol(base, 5))  # keys summed in another order


def test_zero_params_score_zero():
    x = RNG.normal(size=(3, 9, 25)).astype(np.float32)
    s = scoring.score_tokens(scoring.zeros(CFG), CFG, jnp.asarray(x), jnp.ones((3, 9), bool))
    np.testing.assert_array_equal(s, 0.0)


def test_mlp_scorer_matches_numpy():
    cfg = NAMMConfig(scorer=ScorerConfig(kind="mlp", mlp_depth=3, mlp_bias=True, mlp_residual=True))
    assert scoring.num_params(cfg) == 2 * (25 * 25 + 25) + 26
    flat = random_params(cfg, seed=7)
    x = RNG.normal(size=(2, 4, 25)).astype(np.float32)
    got = np.asarray(scoring.score_tokens(flat, cfg, jnp.asarray(x), jnp.ones((2, 4), bool)))
    p = {k: np.asarray(v, np.float64) for k, v in scoring.unflatten(flat, cfg).items()}
    h = x.astype(np.float64)
    for i in range(2):
        h = h + np.maximum(h @ p[f"mlp.{i}.weight"] + p[f"mlp.{i}.bias"], 0)
    want = (h @ p["head.weight"] + p["head.bias"])[..., 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=3 * 26 * EPS32 * np.abs(want).max())  # 3 layers of 25 terms + bias


def test_config_errors_and_roundtrip():
    assert NAMMConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.feature_dim == 25
    with pytest.raises(ConfigError, match="unknown key"):
        NAMMConfig.from_dict({"scorer": {"hiden": 3}})
    with pytest.raises(ConfigError, match="kind"):
        ScorerConfig(kind="tcn")
    with pytest.raises(ValueError, match="features have 24"):
        scoring.score_tokens(scoring.zeros(CFG), CFG, jnp.zeros((1, 3, 24)), jnp.ones((1, 3), bool))


def test_blocked_backward_attention_equals_dense():
    # Long caches use a chronologically sorted, block-triangular computation; it must equal the dense one,
    # including slots out of chronological order and padding.
    n = 100
    x = RNG.normal(size=(2, n, 25)).astype(np.float32)
    valid = RNG.random((2, n)) < 0.9
    order = np.stack([RNG.permutation(n) for _ in range(2)]).astype(np.int32)
    flat = random_params(CFG, seed=9)
    variables = scoring.to_flax(scoring.unflatten(flat, CFG), CFG)
    args = (jnp.asarray(x), jnp.asarray(valid), jnp.asarray(order))
    dense = np.asarray(jax.jit(scoring.BAM(block_size=None).apply)(variables, *args))
    blocked = np.asarray(jax.jit(scoring.BAM(block_size=32).apply)(variables, *args))
    # the same products; the softmax normaliser and A V sum over the n keys in blocks instead of at once
    np.testing.assert_allclose(blocked[valid], dense[valid], rtol=0, atol=bam_score_atol(dense[valid], n))
    assert np.isfinite(blocked).all()
