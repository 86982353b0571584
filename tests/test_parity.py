"""Torch runtime vs JAX core on the same golden tensors: features, scores (1e-5 fp32), keep decisions."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from namm import baselines as jbase  # noqa: E402
from namm import features as jfeat  # noqa: E402
from namm import policy as jpolicy  # noqa: E402
from namm import scoring as jscore  # noqa: E402
from namm import selection as jsel  # noqa: E402
from namm.config import NAMMConfig, ScorerConfig, SelectionConfig  # noqa: E402
from namm.torch import baselines as tbase  # noqa: E402
from namm.torch import features as tfeat  # noqa: E402
from namm.torch import scoring as tscore  # noqa: E402
from namm.torch import selection as tsel  # noqa: E402
from namm.torch.policy import NAMMPolicy  # noqa: E402

from conftest import EPS32, bam_score_atol, undecided_keep  # noqa: E402

CFG = NAMMConfig()
H, S_OLD, N_NEW = 2, 40, 32
S = S_OLD + N_NEW


def t(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


@pytest.fixture(scope="module")
def golden():
    """One layer's update: 40 retained tokens (gapped positions) + 32 new ones, random rows and state."""
    rng = np.random.default_rng(0)
    old_pos = np.sort(rng.choice(300, S_OLD, replace=False))
    positions = np.concatenate([old_pos, np.arange(300, 300 + N_NEW)]).astype(np.int32)
    logits = rng.normal(size=(H, N_NEW, S)) * 2
    causal = np.arange(S)[None, :] <= (np.arange(N_NEW)[:, None] + S_OLD)
    logits = np.where(causal[None], logits, -np.inf)
    rows = np.exp(logits - logits.max(-1, keepdims=True))
    rows = (rows / rows.sum(-1, keepdims=True)).astype(np.float32)  # [H, n, S]
    ema = np.abs(rng.normal(size=(H, S, 17))).astype(np.float32) * 0.05
    ctx = np.abs(rng.normal(size=(H, S, 16))).astype(np.float32) * 0.05
    ema[:, S_OLD:] = 0
    ctx[:, S_OLD:] = 0
    mean = (np.abs(rng.normal(size=17)) * 0.02).astype(np.float32)
    var = (np.abs(rng.normal(size=17)) * 1e-3 + 1e-4).astype(np.float32)
    flat = (rng.normal(size=jscore.num_params(CFG)) * 0.3).astype(np.float32)
    keys = rng.normal(size=(H, S, 8)).astype(np.float32)
    return dict(positions=positions, rows=rows, ema=ema, ctx=ctx, mean=mean, var=var, flat=flat, keys=keys)


def test_feature_pieces(golden):
    rng = np.random.default_rng(1)
    attn = rng.random((6, 32, 20)).astype(np.float32)
    # a 3-term float32 mean each, in its own order
    np.testing.assert_allclose(tfeat.gqa_average(t(attn), 2).numpy(), np.asarray(jfeat.gqa_average(attn, 2)),
                               rtol=4 * EPS32, atol=0)
    series = rng.random((3, 20, 48)).astype(np.float32)
    # two float32 DFTs of n_fft = 32 terms (series >= 0: the DC bin bounds every bin's sum of |terms|)
    jstft = np.asarray(jfeat.stft_magnitudes(series, CFG))
    np.testing.assert_allclose(tfeat.stft_magnitudes(t(series), CFG).numpy(), jstft, rtol=0, atol=32 * EPS32 * jstft.max())
    rec = np.array([0, 1, 5, 100, 1000, 2047])
    # both float64 tables rounded once to float32 (values <= 1): at most one float32 ulp apart
    np.testing.assert_allclose(
        tfeat.age_embedding(torch.from_numpy(rec), CFG).numpy(), np.asarray(jfeat.age_embedding(rec, CFG)),
        rtol=0, atol=EPS32 / 2,
    )
    # large ages: the runtime's float64-built table is exact to float32 rounding (clipped at max_age)
    rec = np.array([6000, 32768, 40000])
    r = np.minimum(rec, CFG.features.max_age)[:, None] * (50000.0 ** (-np.arange(4) / 4))
    np.testing.assert_allclose(
        tfeat.age_embedding(torch.from_numpy(rec), CFG).numpy(), np.concatenate([np.sin(r), np.cos(r)], -1),
        rtol=0, atol=EPS32 / 2,
    )
    x = rng.normal(size=(50, 17)).astype(np.float32)
    stats = tfeat.NormStats(17).update(t(x[:20])).update(t(x[20:]))
    mean, var = stats.finalize()
    jstats = jfeat.NormStats.init(17).update(x[:20]).update(x[20:]).finalize()
    # float32 sums of 50 terms in two orders: n eps mean|x| for the mean, n eps mean(x^2) for the variance
    np.testing.assert_allclose(mean.numpy(), np.asarray(jstats.mean), rtol=0, atol=50 * EPS32 * np.abs(x).mean(0).max())
    np.testing.assert_allclose(var.numpy(), np.asarray(jstats.var), rtol=0, atol=50 * EPS32 * (x ** 2).mean(0).max())


def test_token_features_and_scores(golden):
    g = golden
    is_new = np.broadcast_to(np.arange(S) >= S_OLD, (H, S))
    recency = np.broadcast_to(g["positions"].max() - g["positions"], (H, S))
    jf, jema, jctx = jfeat.token_features(
        g["rows"], g["ctx"], g["ema"], is_new, recency, jfeat.NormParams(g["mean"], g["var"]), CFG
    )
    tf, tema, tctx = tfeat.token_features(
        t(g["rows"]), t(g["ctx"]), t(g["ema"]), torch.from_numpy(is_new.copy()),
        torch.from_numpy(recency.copy()), (t(g["mean"]), t(g["var"])), CFG,
    )
    # two float32 DFT-and-EMA orders: n_fft terms per bin of a series >= 0 whose |terms| sum to at most its
    # column sum (context + rows of a key), EMA weights < 1, plus the old EMA's decay product
    ema_tol = 32 * EPS32 * (g["ctx"].sum(-1) + g["rows"].sum(1)).max() + 2 * EPS32 * g["ema"].max()
    np.testing.assert_allclose(tema.numpy(), np.asarray(jema), rtol=0, atol=ema_tol)
    np.testing.assert_array_equal(tctx.numpy(), np.asarray(jctx))                 # the carried context: a copy
    # the EMA's error divided by sigma = sqrt(var) (>= 1e-2 here), plus the normalisation's own roundings
    jf_ = np.asarray(jf)
    np.testing.assert_allclose(tf.numpy(), jf_, rtol=0, atol=ema_tol / np.sqrt(g["var"]).min() + 4 * EPS32 * np.abs(jf_).max())
    valid = np.ones((H, S), bool)
    js = np.asarray(jscore.score_tokens(g["flat"], CFG, np.asarray(jf), valid))
    ts = tscore.score_tokens(tscore.unflatten(t(g["flat"]), CFG), CFG, t(np.asarray(jf)))
    np.testing.assert_allclose(ts.numpy(), js, rtol=0, atol=bam_score_atol(js, S))   # the BAM chain, torch vs XLA order
    # with invalid slots (masked mode) the backward mask also drops them
    valid[0, ::3] = False
    js = np.asarray(jscore.score_tokens(g["flat"], CFG, np.asarray(jf), valid))
    ts = tscore.score_tokens(tscore.unflatten(t(g["flat"]), CFG), CFG, t(np.asarray(jf)), torch.from_numpy(valid))
    np.testing.assert_allclose(ts.numpy()[valid], js[valid], rtol=0, atol=bam_score_atol(js[valid], S))


@pytest.mark.parametrize("feat", [
    {}, {"n_fft": 64, "hop": 16}, {"n_fft": 24, "hop": 16}, {"n_fft": 16, "hop": 16},
    {"output": "real_imag"}, {"window": "hann_symmetric", "ema_coeff": 0.9},
], ids=["paper", "context_over_n", "hop_not_dividing", "no_context", "real_imag", "symmetric"])
def test_token_features_query_major_matches_framed_reference(feat):
    """The runtime's query-major features (EMA weight folded into each frame's DFT basis) and the JAX ones
    equal the frame-by-frame reference (``stft_magnitudes`` + ``ema_reduce`` on each key's series),
    on non-causal rows (so the new-key frame mask matters), scattered new keys, batch axes and
    configs other than the paper's."""
    from dataclasses import replace

    cfg = NAMMConfig(features=replace(CFG.features, **feat))
    c = cfg.features
    rng = np.random.default_rng(3)
    b, h, n, keys = 2, 3, 32, 45
    rows = rng.random((b, h, n, keys)).astype(np.float32)
    is_new = np.zeros((b, h, keys), bool)
    is_new[..., rng.choice(keys, n, replace=False)] = True
    recency = np.zeros((b, h, keys), np.int64)
    recency[is_new] = np.tile(rng.permutation(n), b * h)
    recency[~is_new] = n + rng.integers(0, 500, int((~is_new).sum()))
    ctx = rng.random((b, h, keys, c.context)).astype(np.float32)
    ema = rng.random((b, h, keys, c.spec_dim)).astype(np.float32)
    # reference: frame each key's series [context | its attention column], STFT, EMA over frames
    series = np.concatenate([np.where(is_new[..., None], 0.0, ctx), np.swapaxes(rows, -1, -2)], -1)
    spec = jfeat.stft_magnitudes(jnp.asarray(series, jnp.float32), cfg)                     # [b, h, T, N, S]
    want_ema = np.asarray(jfeat.ema_reduce(spec, ema, is_new, n - 1 - recency, cfg))
    want_ctx = series[..., series.shape[-1] - c.context:]
    got_t = tfeat.token_features(t(rows), t(ctx), t(ema), torch.from_numpy(is_new), torch.from_numpy(recency),
                                 None, cfg)
    got_j = [jfeat.token_features(rows[i], ctx[i], ema[i], is_new[i], recency[i], None, cfg) for i in range(b)]
    # float32 in both orders (frame by frame / query-major): n_fft terms per DFT bin of a series >= 0 (its DC
    # bin, the largest |output|, also with real_imag, bounds every bin's sum of |terms|), then T frames and the
    # old EMA's decay summed
    spec = np.asarray(spec)
    tol = (c.n_fft + spec.shape[-3]) * EPS32 * np.abs(spec).max() + 2 * EPS32 * ema.max()
    for got_ema, got_ctx, got_feat in (
        (got_t[1].numpy(), got_t[2].numpy(), got_t[0].numpy()),
        tuple(np.stack([np.asarray(g[k]) for g in got_j]) for k in (1, 2, 0)),
    ):
        np.testing.assert_allclose(got_ema, want_ema, rtol=0, atol=tol)
        np.testing.assert_array_equal(got_ctx, want_ctx)                           # a copy
        np.testing.assert_allclose(got_feat[..., c.age_dim:], want_ema, rtol=0, atol=tol)


def test_mlp_scorer_parity():
    cfg = NAMMConfig(scorer=ScorerConfig(kind="mlp", mlp_depth=3, mlp_width=25, mlp_bias=True, mlp_residual=True))
    rng = np.random.default_rng(2)
    flat = rng.normal(size=jscore.num_params(cfg)).astype(np.float32)
    x = rng.normal(size=(2, 30, 25)).astype(np.float32)
    assert tscore.param_layout(cfg) == jscore.param_layout(cfg)
    js = np.asarray(jscore.score_tokens(flat, cfg, x, np.ones((2, 30), bool)))
    ts = tscore.score_tokens(tscore.unflatten(t(flat), cfg), cfg, t(x))
    # 3 layers of 25 terms + bias, torch vs XLA order; scale: the largest |score|
    np.testing.assert_allclose(ts.numpy(), js, rtol=0, atol=3 * 26 * EPS32 * np.abs(js).max())


def test_traced_cap_equals_top_k():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(3, 50)).astype(np.float32)
    valid = rng.random((3, 50)) > 0.2
    newest = np.asarray(jsel.newest_mask(np.broadcast_to(np.arange(50), (3, 50)).astype(np.int32), valid))
    for mode in ("ragged_max", "masked"):
        sel = SelectionConfig(mode=mode, threshold=-1e30)
        capped = jax.jit(lambda c: jsel.select(scores, valid, newest, sel, c))(jnp.int32(12))
        top_k = jsel.select(scores, valid, newest, SelectionConfig(mode=mode, threshold=-1e30, top_k=12))
        assert (np.asarray(capped) == np.asarray(top_k)).all()
        assert np.asarray(capped).sum(-1).max() == 12
    assert int(jsel.budget_cap(0.5, 333)) == tsel.budget_tokens(0.5, 333) == 166  # round half to even
    assert int(jsel.budget_cap(0.25, 10)) == tsel.budget_tokens(0.25, 10) == 2
    assert int(jsel.budget_cap(7, 100)) == 7
    with pytest.raises(ValueError, match="budget"):
        jsel.budget_cap(1.5, 10)


@pytest.mark.parametrize("sel", [SelectionConfig(), SelectionConfig(mode="masked"), SelectionConfig(top_k=20)])
def test_selection_parity(sel):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(3, 50)).astype(np.float32)
    scores[1, :10] = 0.0  # ties at the threshold are kept
    valid = rng.random((3, 50)) > 0.2
    pos = np.broadcast_to(np.arange(50), (3, 50)).astype(np.int32)
    newest = np.asarray(jsel.newest_mask(pos, valid))
    jk = np.asarray(jsel.select(scores, valid, newest, sel))
    tn = tsel.newest_mask(torch.from_numpy(pos.copy()).long(), torch.from_numpy(valid))
    assert (tn.numpy() == newest).all()
    tk = tsel.select(t(scores), torch.from_numpy(valid), tn, sel)
    assert (tk.numpy() == jk).all()


@pytest.mark.parametrize("mode,budget", [("ragged_max", None), ("masked", None), ("ragged_max", 0.1),
                                         ("masked", 0.1), ("ragged_max", 20)])
def test_policy_step_parity(golden, mode, budget):
    """One full NAMM update (features + BAM + selection, with or without a runtime budget): same
    scores and same kept tokens. The JAX side takes the tokens seen from the newest position. Under a
    budget the threshold is off, so the cap is what binds."""
    g = golden
    cfg = NAMMConfig(selection=SelectionConfig(mode=mode, threshold=0.0 if budget is None else -1e30))
    state = jpolicy.PolicyState(
        ema=jnp.asarray(g["ema"]), left_context=jnp.asarray(g["ctx"]),
        positions=jnp.asarray(np.where(np.arange(S) < S_OLD, g["positions"], 0)[None].repeat(H, 0)),
        valid=jnp.asarray(np.broadcast_to(np.arange(S) < S_OLD, (H, S))),
    )
    valid = np.ones((H, S), bool)
    _, jscores, jkeep = jpolicy.update(
        g["flat"], (g["mean"], g["var"]), state, g["rows"], g["positions"], valid, cfg, budget
    )
    policy = NAMMPolicy.from_flat(t(g["flat"]), cfg, (g["mean"], g["var"]), budget=budget)
    out = policy.update(
        {"ema": t(g["ema"][:, :S_OLD])[None], "left_context": t(g["ctx"][:, :S_OLD])[None]},
        t(g["rows"])[None], t(g["keys"])[None], torch.from_numpy(g["positions"]).long().expand(1, H, S),
        None, N_NEW, 332, 0, False,
    )
    # torch and XLA sum the same BAM chain in their own orders (S keys attended)
    tol = bam_score_atol(jscores, S)
    np.testing.assert_allclose(out.scores[0].numpy(), np.asarray(jscores), rtol=0, atol=tol)
    jkeep = np.asarray(jkeep)
    assert 0 < jkeep.sum() < jkeep.size  # the golden case really evicts
    if budget is not None:  # 0.1 of the 332 tokens seen -> 33; 20 tokens
        assert jkeep.sum(-1).max() == (33 if budget == 0.1 else 20)
    tkeep = np.zeros((H, S), bool)
    idx = out.keep[0].numpy()
    flags = np.ones_like(idx, bool) if out.valid is None else out.valid[0].numpy()
    for h in range(H):
        tkeep[h, idx[h][flags[h]]] = True
    # the same kept tokens, exactly, but for near ties: scores within tol of the threshold or of the cap's boundary
    newest = np.asarray(jsel.newest_mask(np.broadcast_to(g["positions"], (H, S)), valid))
    cap = None if budget is None else int(jsel.budget_cap(budget, 332))
    near_tie = undecided_keep(jscores, valid, newest, tol, cfg.selection, cap)
    assert near_tie.sum() <= 2                                  # the exact comparison covers (almost) every token
    assert (tkeep == jkeep)[~near_tie].all()


@pytest.mark.parametrize(
    "name,knobs",
    [("recency", {}), ("streamingllm", {"sinks": 3}), ("h2o", {"recent_fraction": 0.5}),
     ("l2", {"recent_fraction": 0.25}), ("snapkv", {"window": 8, "kernel": 5})],
)
@pytest.mark.parametrize("budget", [0.1, 17])
def test_baseline_parity(golden, name, knobs, budget):
    g = golden
    jp = jbase.make_baseline(name, budget=budget, **knobs)
    acc_old = np.abs(np.random.default_rng(4).normal(size=(H, S))).astype(np.float32)
    acc_old[:, S_OLD:] = 0
    state = jbase.BaselineState(
        positions=jnp.asarray(np.where(np.arange(S) < S_OLD, g["positions"], 0)[None].repeat(H, 0)),
        valid=jnp.asarray(np.broadcast_to(np.arange(S) < S_OLD, (H, S))),
        acc=jnp.asarray(acc_old),
    )
    _, jscores, jkeep = jp.update(None, state, g["rows"], g["positions"], np.ones((H, S), bool), keys=g["keys"], layer=1)
    tp = tbase.make_baseline(name, budget=budget, **knobs)
    rows = t(g["rows"])[None]
    if name == "snapkv":
        rows = rows[:, :, -8:]  # the cache buffers only the observation window
    out = tp.update(
        {"acc": t(acc_old[:, :S_OLD])[None]}, rows, t(g["keys"])[None],
        torch.from_numpy(g["positions"]).long().expand(1, H, S), None, N_NEW, 332, 1, False,
    )
    tkeep = np.zeros((H, S), bool)
    for h in range(H):
        tkeep[h, out.keep[0, h].numpy()] = True
    jkeep = np.asarray(jkeep)
    # exact, and not by luck: no kept-vs-dropped pair ordered by score is within twice the float32 error of the
    # scores (sums of <= 32 rows) of a tie; exact ties (SnapKV's pooling copies a vote) go by slot index on both sides
    s = np.asarray(jscores, np.float64)
    tol = 32 * EPS32 * np.abs(s[np.isfinite(s)]).max()
    for h in range(H):
        gap = s[h][jkeep[h]][:, None] - s[h][~jkeep[h]][None, :]
        assert not ((gap > 0) & (gap <= 2 * tol)).any()
    assert (tkeep == jkeep).all()
    assert tkeep.sum(-1).tolist() == [tbase.resolve_budget(budget, 332)] * H
