"""Neighbour-pooled features (``features.pool_kernel``): the pooling against a plain loop, torch against JAX, a widened
policy scoring exactly as the one it came from, and a pooled policy through export and generation."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from namm import features as jfeat  # noqa: E402
from namm import policy as jpolicy  # noqa: E402
from namm import scoring as jscore  # noqa: E402
from namm.config import ConfigError, FeatureConfig, NAMMConfig, ScorerConfig, SelectionConfig  # noqa: E402
from namm.torch import features as tfeat  # noqa: E402
from namm.torch.policy import NAMMPolicy  # noqa: E402

from conftest import bam_score_atol  # noqa: E402

POOLED = NAMMConfig(features=FeatureConfig(pool_kernel=5))


def loop_pool(x, order, valid, kernel):
    """Reference: per row, each valid token's max over the kernel//2 valid neighbours on each side by position."""
    out = np.zeros_like(x)
    for r in np.ndindex(valid.shape[:-1]):
        idx = [i for i in np.argsort(order[r], kind="stable") if valid[r][i]]
        for k, i in enumerate(idx):
            near = idx[max(0, k - kernel // 2): k + kernel // 2 + 1]
            out[r][i] = x[r][near].max(0)
    return out


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    h, n, d = 3, 23, 4
    order = np.stack([rng.permutation(1000)[:n] for _ in range(h)]).astype(np.int32)   # gapped, shuffled slots
    valid = rng.random((h, n)) > 0.25
    x = rng.normal(size=(h, n, d)).astype(np.float32)
    return x, order, valid


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_neighbour_max_matches_a_loop_and_torch_matches_jax(rows, kernel):
    x, order, valid = rows
    ref = loop_pool(x, order, valid, kernel)
    j = np.asarray(jfeat.neighbour_max(jnp.asarray(x), jnp.asarray(order), jnp.asarray(valid), kernel))
    np.testing.assert_array_equal(j, ref)                                    # a max moves no value
    t = tfeat.neighbour_max(torch.from_numpy(x), torch.from_numpy(order), torch.from_numpy(valid), kernel).numpy()
    np.testing.assert_array_equal(t, ref)


def test_pool_kernel_config():
    assert NAMMConfig().feature_dim == 25 and POOLED.feature_dim == 42
    assert NAMMConfig.from_dict(POOLED.to_dict()) == POOLED
    assert NAMMConfig.from_dict({"features": {"n_fft": 32}}).features.pool_kernel == 0   # policies saved before it
    for bad in (1, 2, 4, -3, True):
        with pytest.raises(ConfigError, match="pool_kernel"):
            FeatureConfig(pool_kernel=bad)


@pytest.mark.parametrize("scorer", [ScorerConfig(), ScorerConfig(kind="mlp", mlp_depth=2, mlp_width=8, mlp_bias=True)])
def test_widened_policy_scores_exactly_as_before(rows, scorer):
    rng = np.random.default_rng(1)
    small, big = NAMMConfig(scorer=scorer), NAMMConfig(features=FeatureConfig(pool_kernel=3), scorer=scorer)
    flat = (rng.normal(size=jscore.num_params(small)) * 0.3).astype(np.float32)
    wide = jscore.widen_features(flat, small, big)
    assert wide.shape == (jscore.num_params(big),)
    _, order, valid = rows
    feats = jnp.asarray(rng.normal(size=valid.shape + (25,)).astype(np.float32))
    pooled = jfeat.with_pooled(feats, jnp.asarray(order), jnp.asarray(valid), big)
    assert pooled.shape[-1] == 42
    a = jscore.score_tokens(jnp.asarray(flat), small, feats, valid, order)
    b = jscore.score_tokens(jnp.asarray(wide), big, pooled, valid, order)
    # zero weights add exact zeros, but XLA may group the longer sums differently: the summation-order bound
    np.testing.assert_allclose(np.asarray(b)[valid], np.asarray(a)[valid], rtol=0,
                               atol=bam_score_atol(a, valid.shape[-1]))
    with pytest.raises(ValueError, match="pool_kernel"):
        jscore.widen_features(wide, big, small)


def test_pooled_policy_step_parity():
    """One NAMM update with pooling, JAX core against the torch runtime: the same scores and kept tokens."""
    rng = np.random.default_rng(2)
    h, s_old, n_new = 2, 24, 32
    s = s_old + n_new
    positions = np.concatenate([np.sort(rng.choice(200, s_old, replace=False)), np.arange(200, 200 + n_new)])
    logits = np.where(np.arange(s)[None] <= np.arange(n_new)[:, None] + s_old, rng.normal(size=(h, n_new, s)) * 2,
                      -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = (attn / attn.sum(-1, keepdims=True)).astype(np.float32)
    ema = np.zeros((h, s, 17), np.float32)
    ema[:, :s_old] = np.abs(rng.normal(size=(h, s_old, 17))) * 0.05
    ctx = np.zeros((h, s, 16), np.float32)
    ctx[:, :s_old] = np.abs(rng.normal(size=(h, s_old, 16))) * 0.05
    mean, var = np.full(17, 0.01, np.float32), np.full(17, 1e-3, np.float32)
    cfg = NAMMConfig(features=FeatureConfig(pool_kernel=5), selection=SelectionConfig(threshold=-1e30))
    flat = (rng.normal(size=jscore.num_params(cfg)) * 0.3).astype(np.float32)
    state = jpolicy.PolicyState(ema=jnp.asarray(ema), left_context=jnp.asarray(ctx),
                                positions=jnp.asarray(np.where(np.arange(s) < s_old, positions, 0)[None].repeat(h, 0)),
                                valid=jnp.asarray(np.broadcast_to(np.arange(s) < s_old, (h, s))))
    _, jscores, jkeep = jpolicy.update(flat, (mean, var), state, attn, positions, np.ones((h, s), bool), cfg, 20)
    policy = NAMMPolicy.from_flat(torch.from_numpy(flat), cfg, (mean, var), budget=20)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))   # noqa: E731
    out = policy.update({"ema": t(ema[:, :s_old])[None], "left_context": t(ctx[:, :s_old])[None]}, t(attn)[None],
                        t(rng.normal(size=(h, s, 8)).astype(np.float32))[None],
                        torch.from_numpy(positions).long().expand(1, h, s), None, n_new, 232, 0, False)
    np.testing.assert_allclose(out.scores[0].numpy(), np.asarray(jscores), rtol=0, atol=bam_score_atol(jscores, s))
    kept = np.zeros((h, s), bool)
    for i in range(h):
        kept[i, out.keep[0, i].numpy()] = True
    assert (np.asarray(jkeep).sum(-1) == 20).all()
    assert (kept == np.asarray(jkeep)).mean() > 0.95                        # but for near ties of the cap's boundary


def test_pooled_policy_exports_and_generates(tmp_path, tiny_llama, one_torch_thread):
    from namm.export import save_pretrained
    from namm.torch.cache import model_signature
    from namm.torch.generate import greedy_generate

    model, _ = tiny_llama
    flat = (np.random.default_rng(3).normal(size=jscore.num_params(POOLED)) * 0.3).astype(np.float32)
    save_pretrained(tmp_path / "p", flat, POOLED, None, model_signature(model), trained_budget=0.5)
    policy = NAMMPolicy.from_pretrained(tmp_path / "p")
    assert policy.cfg.features.pool_kernel == 5
    ids = torch.randint(3, 100, (1, 300), generator=torch.Generator().manual_seed(0))
    out = greedy_generate(model, ids, None, 4, policy=policy)
    assert len(out.token_ids) == 4 and 0 < max(out.stored_tokens) < 304
