"""Divergences on top-k teacher buckets, the acceptance estimate, and the resumable training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lib.models import tiny_random
from spec_decode.data import frequent_vocab, inverse_map, make_windows, sample_batch
from spec_decode.distill import DIVERGENCES, DistillConfig, acceptance, buckets, divergence, train
from spec_decode.draft import DraftConfig, forward, params_from_hf

from conftest import EPS32


def _dist(rng, n, v):
    x = rng.normal(size=(n, v)) * 2
    return jax.nn.log_softmax(jnp.asarray(x), -1)


def test_divergences_vanish_at_equality_and_tvd_is_one_minus_alpha():
    rng = np.random.default_rng(0)
    logq = _dist(rng, 5, 20)
    ids = jnp.argsort(-logq, -1)[:, :20]           # k = V: no tail
    logp = jnp.take_along_axis(logq, ids, -1)
    p, q = buckets(logq, ids, logp)
    for name in DIVERGENCES:
        np.testing.assert_array_equal(divergence(name, p, q), 0.0, err_msg=name)   # p == q bit for bit: exactly 0
    logp2 = _dist(rng, 5, 20)
    p2, q2 = buckets(logq, ids, jnp.take_along_axis(logp2, ids, -1))
    tvd = divergence("tvd", p2, q2)
    # beta = 1 - TVD: both float32 sums over the 21 buckets of terms <= 1 (and each side's total of 1 rounded)
    np.testing.assert_allclose(tvd, 1.0 - acceptance(p2, q2), rtol=0, atol=2 * 21 * EPS32)
    assert np.all(divergence("fkl", p2, q2) > 0) and np.all(divergence("rkl", p2, q2) > 0)
    jsd = divergence("jsd", p2, q2, 0.5)
    assert np.all(jsd > 0) and np.all(jsd <= np.log(2) + 1e-6)


def test_tail_bucket_and_missing_draft_tokens():
    logq = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    p, q = buckets(logq, jnp.array([[0, -1]]), jnp.log(jnp.array([[0.6, 0.3]])))  # token 2 not in the draft head
    # float32 exp(log x) (a few ulps) and the tail 1 - sum (absolute: the ulps of 1)
    np.testing.assert_allclose(p, [[0.6, 0.3, 0.1]], rtol=0, atol=4 * EPS32)
    np.testing.assert_allclose(q, [[0.5, 0.0, 0.5]], rtol=0, atol=4 * EPS32)
    np.testing.assert_allclose(acceptance(p, q), [0.5], rtol=0, atol=4 * EPS32)
    with pytest.raises(ValueError, match="divergence='kl'"):
        DistillConfig(divergence="kl")


def _teacher_seqs(target, n, k=8, length=40, prompt=24):
    import torch

    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(n):
        toks = rng.integers(0, 256, length)
        with torch.no_grad():
            logp = torch.log_softmax(target(torch.tensor(toks[None])).logits[0], -1)
        v, i = torch.topk(logp, k, -1)
        seqs.append({"tokens": toks.astype(np.int32), "prompt_len": prompt, "topk_ids": i.numpy().astype(np.int32),
                     "topk_logp": v.numpy()})
    return seqs


@pytest.fixture(scope="module")
def setup():
    target, _ = tiny_random("llama", seed=0)
    cfg = DraftConfig.from_target(target.config.to_dict(), num_layers=1)
    params = params_from_hf({k: v.numpy() for k, v in target.state_dict().items()}, cfg)
    seqs = _teacher_seqs(target, 12)
    pools = {"fixed": make_windows(seqs, "fixed", 32), "teacher": make_windows(seqs, "teacher", 32)}
    return cfg, params, pools


def test_windows_and_mixed_batches(setup):
    _, _, pools = setup
    t = pools["teacher"]
    assert t.tokens.shape == (12, 32) and t.mask[0].sum() == 40 - 23        # continuation predictions
    assert pools["fixed"].mask[0].sum() == 23                             # prompt predictions
    assert t.positions[0, 0] == 8                                         # original positions kept
    b = sample_batch(pools, {"fixed": 0.0, "teacher": 1.0}, 4, np.random.default_rng(0))
    assert len(b) == 4
    with pytest.raises(ValueError, match="empty"):
        sample_batch(pools, {"draft": 1.0}, 4, np.random.default_rng(0))
    vm = frequent_vocab([[5, 5, 5, 7, 7, 9]], 3, 300, always=[299])   # size counts the always-kept ids
    assert vm.tolist() == [5, 7, 299] and inverse_map(vm, 300)[7] == 1 and inverse_map(vm, 300)[9] == -1


def test_training_raises_alpha_and_resumes_exactly(setup, tmp_path):
    cfg, params, pools = setup
    dc = DistillConfig(divergence="tvd", steps=12, batch=6, lr=1e-2, warmup=1, eval_every=6, ckpt_every=6,
                       mix=(("fixed", 0.3), ("teacher", 0.7)))
    evals = {"val": pools["teacher"]}
    full, hist = train(cfg, params, pools, dc, eval_sets=evals, progress=False)
    assert hist[-1]["eval/val/alpha"] > hist[0]["eval/val/alpha"]
    assert hist[-1]["eval/val/loss"] < hist[0]["eval/val/loss"]
    ckpt = tmp_path / "ckpt.msgpack"
    train(cfg, params, pools, dc, ckpt_path=ckpt, progress=False, until=6)     # a run killed after step 6
    resumed, _ = train(cfg, params, pools, dc, ckpt_path=ckpt, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))          # the same steps from the checkpoint: bit for bit
    np.testing.assert_array_equal(np.asarray(full["embed"]), np.asarray(params["embed"]))   # embeddings frozen
