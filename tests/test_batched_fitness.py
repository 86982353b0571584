"""fitness=agreement, population-batched: the same measure as one candidate at a time, on the tiny random Llama.

Tolerances. Both paths run in fp32 (unit roundoff u = 6e-8) on the same shared features; they differ only in
the order of sums: BAM's backward attention on the rewritten queries (``namm.torch.population``) against the
candidate's own SDPA, and the answer's attention over the masked shared cache against the gathered one.
Scores here are O(10) and come from sums of <= 300 terms, so they agree to ~300 u * 10 = 2e-4 at the very
worst (observed ~1e-5); a keep decision may only differ where two reference scores at the selection boundary
lie closer than that (a near-tie, ``NEAR_TIE``), and such a candidate is left out of the fitness comparison.
With the same kept slots the logits agree to ~1e-6 relative, and an acceptance ``sum_v min(p, q)`` moves by
at most the total variation between the two q, so fitness is compared at ``FIT_TOL = 1e-5`` (observed ~1e-7).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from namm.config import FeatureConfig, NAMMConfig, ScorerConfig, SelectionConfig
from namm.scoring import num_params

NEAR_TIE = 2e-4
FIT_TOL = 1e-5


@pytest.fixture(scope="module")
def rows(tiny_llama):
    from experiments.tasks import load_task

    _, tok = tiny_llama
    return load_task({"name": "passkey", "n": 2, "context_lengths": [256], "seed": 0}, tok, split="train")


def _cfg(mode="ragged_max", threshold=-1e30, scorer=None):
    return NAMMConfig(features=FeatureConfig(update_interval=64, chunk_size=64), scorer=scorer or ScorerConfig(),
                      selection=SelectionConfig(mode=mode, threshold=threshold))


def _fitness(tiny_llama, rows, cfg, budget=0.5, **kw):
    from experiments.fitness.agreement import AgreementFitness

    model, tok = tiny_llama
    fit = AgreementFitness(model, tok, rows, cfg, None, chat=False, max_context=4096, budget=budget,
                           max_answer_tokens=5, **kw)
    p = fit.prompts[1]  # a prompt whose last prefill chunk is one token
    fit.prompts[1] = replace(p, context_ids=p.context_ids[: 4 * 64 + 1 - len(p.question_ids)])
    return fit


def _pair(tiny_llama, rows, cfg, **kw):
    """(unbatched reference, batched) fitnesses sharing one prepared state per prompt."""
    ref = _fitness(tiny_llama, rows, cfg, batched=False, **kw)
    bat = _fitness(tiny_llama, rows, cfg, batched=True, **kw)
    for i in range(len(rows)):
        ref._prepare(i)
    bat._shared, bat._answers = ref._shared, ref._answers
    return ref, bat


def _near_tie_only(ref_keep, keep, ref_scores, sel_k):
    """Every slot where the two keep masks differ lies within NEAR_TIE of the head's selection boundary."""
    diff = ref_keep != keep
    if not diff.any():
        return True
    s = ref_scores.float()
    top = torch.sort(s, -1, descending=True).values
    k = ref_keep.sum(-1, keepdim=True).clamp(1, s.shape[-1])
    boundary = torch.stack([top.gather(-1, k - 1), top.gather(-1, k.clamp(max=s.shape[-1] - 1))]).mean(0)
    near = (s - boundary).abs() <= NEAR_TIE * max(1.0, float(s.abs().max()))
    if sel_k is None:  # a threshold decision: the boundary is the threshold 0
        near = near | (s.abs() <= NEAR_TIE)
    return bool(near[diff].all())


@pytest.mark.parametrize("mode,threshold,scorer,compress,target", [
    ("ragged_max", -1e30, None, True, "full"),                       # the paper's ranking under the cap
    ("masked", 0.0, None, True, "full"),                             # per-head thresholds: heads keep different counts
    ("ragged_max", 0.0, ScorerConfig(num_heads=2), False, "full"),   # two BAM heads, the question after the eviction
    ("ragged_max", -1e30, ScorerConfig(kind="mlp", mlp_depth=2, mlp_bias=True), True, "full"),  # the MLP ablation
    ("ragged_max", -1e30, None, False, "gold"),                      # the reference answer as the tail
])
def test_batched_equals_unbatched(tiny_llama, rows, mode, threshold, scorer, compress, target, one_torch_thread):
    cfg = _cfg(mode, threshold, scorer)
    ref, bat = _pair(tiny_llama, rows, cfg, compress_question=compress, pop_chunk=3, target=target)
    assert bat.batched and not ref.batched
    pop = 0.3 * np.random.default_rng(1).standard_normal((7, num_params(cfg))).astype(np.float32)
    f_ref, f_bat = ref.evaluate(pop, [0, 1]), bat.evaluate(pop, [0, 1])
    compared = np.ones(len(pop), bool)
    for i in (0, 1):
        shared = ref._prepare(i)
        keeps = bat.population_keeps(pop, shared)
        for k, flat in enumerate(pop):
            policy = ref.policy_for(flat)
            for layer, (feats, positions, valid, seen) in zip(shared.cache.layers, shared.features):
                params = policy._layer_params(layer.layer_idx, feats.device)
                keep, scores, sel = policy.select_tokens(params, feats, positions, valid, seen)
                got = keeps[layer.layer_idx][k]
                if not torch.equal(keep[0], got):
                    assert _near_tie_only(keep[0], got, scores[0], sel.top_k), (i, k, layer.layer_idx)
                    compared[k] = False
    assert compared.sum() >= len(pop) - 1                       # near-ties are rare
    assert np.all(f_ref < 1.0)
    np.testing.assert_allclose(f_bat[compared], f_ref[compared], rtol=0, atol=FIT_TOL)
    for key in ("acceptance", "token_match", "kept_fraction"):
        np.testing.assert_allclose(bat.last_details[key][compared], ref.last_details[key][compared], rtol=0,
                                   atol=FIT_TOL if key == "acceptance" else 1e-12)


def test_keep_all_candidate_reproduces_the_full_cache(tiny_llama, rows, one_torch_thread):
    cfg = _cfg()
    fit = _fitness(tiny_llama, rows, cfg, budget=1.0)
    assert fit.batched                                          # the default without a refresh
    f = fit.evaluate(np.zeros((2, num_params(cfg)), np.float32), [0, 1])
    np.testing.assert_allclose(f, 1.0, rtol=0, atol=1e-6)       # the same distributions up to fp32 rounding
    assert fit.last_details["token_match"].tolist() == [1.0, 1.0]
    assert fit.last_details["kept_fraction"].tolist() == [1.0, 1.0]


def test_chunk_size_does_not_change_results(tiny_llama, rows, one_torch_thread):
    cfg = _cfg("masked", 0.0)
    pop = 0.3 * np.random.default_rng(2).standard_normal((5, num_params(cfg))).astype(np.float32)
    base = _fitness(tiny_llama, rows, cfg, pop_chunk=5)
    f5 = base.evaluate(pop, [0, 1])
    kept5 = base.last_details["kept_fraction"]
    for chunk in (1, 2, 32):
        fit = _fitness(tiny_llama, rows, cfg, pop_chunk=chunk)
        fit._shared, fit._answers = base._shared, base._answers
        np.testing.assert_allclose(fit.evaluate(pop, [0, 1]), f5, rtol=0, atol=FIT_TOL)
        assert np.array_equal(fit.last_details["kept_fraction"], kept5)
    assert np.array_equal(base.evaluate(pop, [0, 1]), f5)       # deterministic, the shared state unchanged


def test_population_scores_match_the_runtime_scorer(one_torch_thread):
    from namm.torch import scoring
    from namm.torch.population import population_scores, stack_params

    gen = torch.Generator().manual_seed(0)
    for scorer in (ScorerConfig(), ScorerConfig(num_heads=2), ScorerConfig(kind="mlp", mlp_depth=3, mlp_bias=True,
                                                                            mlp_residual=True)):
        cfg = _cfg(scorer=scorer)
        flats = 0.3 * torch.randn(4, num_params(cfg), generator=gen)
        feats = torch.randn(1, 2, 150, cfg.feature_dim, generator=gen)
        valid = torch.rand(1, 2, 150, generator=gen) > 0.2
        valid[..., -1] = True
        got = population_scores(stack_params(flats, cfg), cfg, feats, valid)
        for k in range(len(flats)):
            want = scoring.score_tokens(scoring.unflatten(flats[k], cfg), cfg, feats, valid)[0]
            err = ((got[k] - want).abs() * valid[0]).nan_to_num(0.0).max()
            assert err <= 1e-5 * max(1.0, float(want[valid[0]].abs().max())), (scorer.kind, k, float(err))


def test_refresh_falls_back_and_bad_keys_are_refused(tiny_llama, rows):
    from experiments.fitness.agreement import AgreementFitnessError

    cfg = _cfg()
    assert not _fitness(tiny_llama, rows, cfg, refresh_every=2).batched    # refreshes run unbatched
    with pytest.raises(AgreementFitnessError, match="batched=true cannot serve fitness.refresh_every"):
        _fitness(tiny_llama, rows, cfg, refresh_every=2, batched=True)
    for key, bad in (("pop_chunk", 0), ("pop_chunk", 2.5), ("batched", "yes")):
        with pytest.raises(AgreementFitnessError, match=key):
            _fitness(tiny_llama, rows, cfg, **{key: bad})



# bf16 (fitness.precision=bf16): the backward attention and the answer forward in bfloat16, unit roundoff
# 2^-8 = 3.9e-3 against fp32's 6e-8. A logit q . x of K = 32 bf16 products is off by ~sqrt(32) u |q||x| at
# worst-typical, so scores of O(10) move by O(0.1) (observed 0.09 at a largest score of 16.6, i.e. 0.55 % of it;
# compared at BF16_SCORE_TOL = 3 % of the largest score) and tokens near the selection boundary swap; the
# answer's distributions move by a few u. Fitness (an acceptance in [0, 1]) is compared at BF16_FIT_TOL, 5x the
# difference seen on this tiny model (0.010), and the ranking of candidates must survive (Spearman 0.93 seen).
BF16_SCORE_TOL = 0.03
BF16_FIT_TOL = 0.05


def test_population_scores_in_bf16_stay_near_fp32(one_torch_thread):
    from namm.torch.population import population_scores, stack_params

    gen = torch.Generator().manual_seed(3)
    for scorer in (ScorerConfig(), ScorerConfig(num_heads=2)):
        cfg = _cfg(scorer=scorer)
        params = stack_params(0.3 * torch.randn(4, num_params(cfg), generator=gen), cfg)
        feats = torch.randn(1, 2, 150, cfg.feature_dim, generator=gen)
        valid = torch.rand(1, 2, 150, generator=gen) > 0.2
        valid[..., -1] = True
        want = population_scores(params, cfg, feats, valid)
        got = population_scores(params, cfg, feats, valid, dtype=torch.bfloat16)
        assert got.dtype == torch.float32
        v = valid[0].expand_as(want)
        err = float((got - want)[v].abs().max())
        assert 0 < err <= BF16_SCORE_TOL * max(1.0, float(want[v].abs().max())), err   # bf16 did run, and stays close


def test_bf16_fitness_stays_near_fp32(tiny_llama, rows, one_torch_thread):
    from experiments.studies.fitness_correlation import spearman

    cfg = _cfg()
    model = tiny_llama[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = _fitness(tiny_llama, rows, cfg, pop_chunk=4)
    low = _fitness(tiny_llama, rows, cfg, pop_chunk=4, precision="bf16")
    for i in range(len(rows)):
        fp32._prepare(i)
    low._shared, low._answers = fp32._shared, fp32._answers
    pop = 0.3 * np.random.default_rng(4).standard_normal((8, num_params(cfg))).astype(np.float32)
    f32, f16 = fp32.evaluate(pop, [0, 1]), low.evaluate(pop, [0, 1])
    assert low._low_model is not None and next(low._low_model.parameters()).dtype == torch.bfloat16
    assert not np.array_equal(f16, f32)                         # it ran in bf16
    np.testing.assert_allclose(f16, f32, rtol=0, atol=BF16_FIT_TOL)
    assert spearman(f16, f32)["rho"] > 0.5
    # the fitness' own (fp32) model is untouched; the shared prompt state stays fp32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert fp32._shared[0].cache.layers[0].keys.dtype == torch.float32
    np.testing.assert_array_equal(fp32.evaluate(pop, [0, 1]), f32)


def test_bad_precision_is_refused(tiny_llama, rows):
    from experiments.fitness.agreement import AgreementFitnessError

    cfg = _cfg()
    with pytest.raises(AgreementFitnessError, match="precision='fp16'; use fp32 or bf16"):
        _fitness(tiny_llama, rows, cfg, precision="fp16")
    with pytest.raises(AgreementFitnessError, match="serves the batched path only"):
        _fitness(tiny_llama, rows, cfg, precision="bf16", batched=False)


def test_unfused_shared_attention_gives_the_same_fitness(tiny_llama, rows, monkeypatch, one_torch_thread):
    """The answer's attention over the shared slots runs PyTorch's fused CPU flash kernel where it exists; the
    unfused path (logits, softmax, GEMMs: other devices, other builds) gives the same fitness within fp32
    rounding."""
    from namm.torch import population

    assert population._FUSED_CPU is not None                   # this build has it: the default path is fused
    cfg = _cfg("masked", 0.0)
    pop = 0.3 * np.random.default_rng(5).standard_normal((4, num_params(cfg))).astype(np.float32)
    fused = _fitness(tiny_llama, rows, cfg, pop_chunk=4)
    f_fused = fused.evaluate(pop, [0, 1])
    monkeypatch.setattr(population, "_FUSED_CPU", None)
    plain = _fitness(tiny_llama, rows, cfg, pop_chunk=4)
    plain._shared, plain._answers = fused._shared, fused._answers
    np.testing.assert_allclose(plain.evaluate(pop, [0, 1]), f_fused, rtol=0, atol=FIT_TOL)
