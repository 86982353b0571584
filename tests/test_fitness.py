"""The stats fitness: exact renormalisation, attention-output fidelity, budget term, population
independence, baselines under the same simulation, and a 4-device run equal to the 1-device run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from namm import baselines, stats
from namm.config import FeatureConfig, NAMMConfig
from namm.fitness import (FitnessError, StatsFitness, StatsFitnessConfig, _renormalised_rows, load_stats_data)
from namm.scoring import num_params

EPS32 = float(np.finfo(np.float32).eps)   # as tests/conftest.py (a subprocess below imports this module as tests.test_fitness)

ROOT = Path(__file__).resolve().parents[1]
CFG = NAMMConfig(features=FeatureConfig(update_interval=32, chunk_size=32))
FCFG = StatsFitnessConfig(context_queries=6, max_qa_queries=10, budget_target=0.5, budget_weight=1.0)


def synthetic_prompts(n=3, layers=(0, 3), hq=4, hkv=2, d=8, seed=0):
    """Random post-RoPE-like q/k/v with a strong first token (an attention sink), as recorded stats."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ctx, qn, an = 70 + 9 * i, 6, 4
        t = ctx + qn + an
        u = rng.normal(size=d)                              # a direction every query shares
        q = rng.normal(size=(len(layers), hq, t, d)) + u
        k = rng.normal(size=(len(layers), hkv, t, d))
        v = rng.normal(size=(len(layers), hkv, t, d))
        k[:, :, 0] = 1.5 * u                                # token 0 attracts attention: a sink ...
        v[:, :, 0] *= 0.1                                   # ... with a small value
        out.append(stats.PromptStats(q=q.astype(np.float16), k=k.astype(np.float16), v=v.astype(np.float16),
                                     layers=np.asarray(layers), task="passkey", id=f"p{i}", context_len=ctx,
                                     question_len=qn, answer_len=an, score=1.0))
    return out


@pytest.fixture(scope="module")
def fit():
    return StatsFitness(load_stats_data(synthetic_prompts(), CFG, FCFG), CFG, FCFG)


def _softmax_rows(q, k, allowed):
    logits = q @ k.T / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_renormalised_rows_equal_softmax_over_the_kept_subset():
    rng = np.random.default_rng(1)
    hq, hkv, n, t, d = 4, 2, 5, 12, 8
    q, k = rng.normal(size=(hq, n, d)), rng.normal(size=(hkv, t, d))
    valid = rng.random((hkv, t)) < 0.6
    valid[:, -1] = True
    full = np.stack([_softmax_rows(q[h], k[h // 2], np.ones((n, t), bool)) for h in range(hq)])
    got = np.asarray(_renormalised_rows(jnp.asarray(full, jnp.float32), jnp.asarray(valid), 2))
    want = np.stack([_softmax_rows(q[h], k[h // 2], np.broadcast_to(valid[h // 2], (n, t))) for h in range(hq)])
    want = want.reshape(2, 2, n, t).mean(1)                                   # GQA average
    # float32 input rows (one rounding) renormalised by a float32 sum over t keys, then a 2-term mean: all > 0
    np.testing.assert_allclose(got, want, rtol=(t + 4) * EPS32, atol=0)


def test_keep_all_is_exact_and_pays_the_budget_term(fit):
    f = fit.evaluate(jnp.zeros((2, num_params(CFG))), np.arange(fit.num_items))
    # keep-all outputs vs full outputs: the same float32 attention renormalised by a sum over <= 128 keys (each
    # prompt has < 100 tokens), a relative error of <= 128 eps of the output norm
    np.testing.assert_allclose(fit.last_details["error"], 0.0, rtol=0, atol=128 * EPS32)
    np.testing.assert_array_equal(fit.last_details["kept_fraction"], 1.0)     # every token kept: an exact count
    np.testing.assert_allclose(f, 1.0 - (1.0 - 0.5), rtol=0, atol=(128 + 2) * EPS32)  # 1 - error - lambda (kept - target)


def _reference_recency_error(p: stats.PromptStats, layer: int, budget: int, n_up: int, eval_idx, eval_w, cap):
    """NumPy: keep the last ``budget`` tokens at every update boundary; relative L2 error of the outputs."""
    q, k, v = (x[layer].astype(np.float32) for x in (p.q, p.k, p.v))
    hq, t, _ = q.shape
    g = hq // k.shape[0]
    errs, ws = [], []
    for ti, w in zip(eval_idx, eval_w):
        if w == 0:
            continue
        c = ti // n_up
        keep = np.arange(t) <= ti
        if c > 0:                                     # recency window after the last update, plus newer tokens
            keep &= (np.arange(t) >= c * n_up - budget)
        for h in range(hq):
            kh, vh = k[h // g], v[h // g]
            pf = _softmax_rows(q[h, ti][None], kh, (np.arange(t) <= ti)[None])[0]
            pk = _softmax_rows(q[h, ti][None], kh, keep[None])[0]
            of, ok = pf @ vh, pk @ vh
            errs.append(min(np.linalg.norm(ok - of) / (np.linalg.norm(of) + 1e-6), cap))
            ws.append(w)
    return float(np.dot(errs, ws) / np.sum(ws))


def test_fidelity_error_matches_numpy_reference_for_recency(fit):
    budget = 20
    pol = baselines.make_baseline("recency", budget=budget)
    prompts = synthetic_prompts()
    got = fit.evaluate_policy(pol, np.array([1]), name="recency20")
    want = np.mean([_reference_recency_error(prompts[1], l, budget, 32, fit.data.eval_idx[1], fit.data.eval_w[1],
                                             FCFG.error_cap) for l in range(2)])
    # float32 attention (sums over <= 128 keys) against the float64 reference: relative errors to 128 eps, capped at 1
    assert got["error"] == pytest.approx(want, rel=0, abs=128 * EPS32)
    assert 0.0 < got["kept_fraction"] < 1.0
    # the fitness formula on these two numbers: a few float32 roundings of values <= 1
    assert got["fitness"] == pytest.approx(1 - got["error"] - max(0.0, got["kept_fraction"] - 0.5), abs=4 * EPS32)


def test_sink_error_is_capped_and_baselines_rank_sensibly(fit):
    items = np.arange(fit.num_items)
    rec = fit.evaluate_policy(baselines.make_baseline("recency", budget=16), items, "recency16")
    sink = fit.evaluate_policy(baselines.make_baseline("streamingllm", budget=16, sinks=1), items, "stream16")
    assert rec["error"] <= FCFG.error_cap + 1e-6
    assert sink["error"] < rec["error"]              # keeping the sink is far more faithful


def test_population_members_are_independent(fit):
    pop = 0.2 * jax.random.normal(jax.random.key(0), (2, num_params(CFG)))
    f = fit.evaluate(pop, np.array([0, 2]))
    swapped = fit.evaluate(pop[::-1], np.array([0, 2]))       # a candidate's fitness ignores its neighbours
    np.testing.assert_array_equal(f, swapped[::-1])     # vmap lanes run the same ops: bit for bit, in any slot
    assert np.all(f <= 1.0) and abs(f[0] - f[1]) > 1e-6


def test_policy_budget_simulates_the_runtime_cap():
    """Under ``policy_budget`` every candidate keeps exactly the cap, as a baseline at that budget does
    (the same NAMM with its threshold off and no cap would keep everything)."""
    from dataclasses import replace

    cfg = replace(CFG, selection=replace(CFG.selection, threshold=-1e30))
    fcfg = replace(FCFG, policy_budget=0.5, budget_weight=0.0)
    capped = StatsFitness(load_stats_data(synthetic_prompts(), cfg, fcfg), cfg, fcfg)
    items = np.arange(capped.num_items)
    pop = jnp.concatenate([jnp.zeros((1, num_params(cfg))),
                           0.2 * jax.random.normal(jax.random.key(1), (1, num_params(cfg)))])
    f = capped.evaluate(pop, items)
    kept = capped.last_details["kept_fraction"]
    h2o = capped.evaluate_policy(baselines.make_baseline("h2o", budget=0.5), items, "h2o")
    np.testing.assert_array_equal(kept, h2o["kept_fraction"])   # both keep exactly the cap: the same counts, same float
    assert np.all(kept < 0.9)                                # the cap evicts
    assert np.all(f <= 1.0) and np.all(np.isfinite(f))
    with pytest.raises(FitnessError, match="policy_budget"):
        StatsFitnessConfig.from_mapping({"policy_budget": 1.5})


def test_bad_input(fit):
    with pytest.raises(FitnessError, match="expected"):
        fit.evaluate(jnp.zeros((2, 5)), np.arange(1))
    with pytest.raises(FitnessError, match="not recorded"):
        load_stats_data(synthetic_prompts(1), CFG, StatsFitnessConfig(layers=(1,)))
    with pytest.raises(FitnessError, match="unknown key"):
        StatsFitnessConfig.from_mapping({"qa_wieght": 2})


SHARDED = textwrap.dedent("""
    import sys, json, numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    from tests.test_fitness import synthetic_prompts, CFG, FCFG
    from namm.fitness import StatsFitness, load_stats_data
    from namm.scoring import num_params
    fit = StatsFitness(load_stats_data(synthetic_prompts(), CFG, FCFG), CFG, FCFG)
    pop = 0.2 * jax.random.normal(jax.random.key(3), (8, num_params(CFG)))
    f = fit.evaluate(pop, np.array([0, 1, 2]))
    print(json.dumps({"devices": len(jax.devices()), "fitness": np.asarray(f).tolist()}))
""")


def test_four_device_sharded_population_equals_one_device():
    procs = []
    for n in (1, 4):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        procs.append(subprocess.Popen([sys.executable, "-c", SHARDED, str(ROOT)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["devices"] for o in outs] == [1, 4]
    np.testing.assert_array_equal(outs[0]["fitness"], outs[1]["fitness"])
