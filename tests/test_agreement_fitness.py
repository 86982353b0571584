"""fitness=agreement: shared prefill, one eviction at the end of the prefill, acceptance against the full cache."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from namm.config import FeatureConfig, NAMMConfig, SelectionConfig
from namm.scoring import num_params

from conftest import EPS32


def _acceptance_atol(tiny_llama, fit) -> float:
    """How far from each other two acceptances of the same policy can be by rounding alone.

    1 - sum_v min(p, q) = TVD(p, q) <= max_v |logit_p - logit_q| (float64 softmax of float32 logits). A draft
    cache holding the same K/V as the full cache (or the same policy run another way) runs its attention on
    other buffer shapes, so its logits differ by float32 reorderings of hidden_size-term dot products: at most
    hidden_size eps max|logit|, the logit scale measured on the first prompt.
    """
    model = tiny_llama[0]
    with torch.no_grad():
        scale = model(input_ids=torch.tensor([fit.prompts[0].context_ids])).logits.abs().max().item()
    return model.config.hidden_size * EPS32 * scale


@pytest.fixture(scope="module")
def rows(tiny_llama):
    from experiments.tasks import load_task

    _, tok = tiny_llama
    # 2 passkey prompts at 256 tokens; the second is cut to 4 * 64 + 1 tokens below (a last chunk of 1 token)
    return load_task({"name": "passkey", "n": 2, "context_lengths": [256], "seed": 0}, tok, split="train")


def _fitness(tiny_llama, rows, mode="ragged_max", budget=0.5, **kw):
    from experiments.fitness.agreement import AgreementFitness

    model, tok = tiny_llama
    cfg = NAMMConfig(features=FeatureConfig(update_interval=64, chunk_size=64),
                     selection=SelectionConfig(mode=mode, threshold=-1e30))
    fit = AgreementFitness(model, tok, rows, cfg, None, chat=False, max_context=4096, budget=budget,
                           max_answer_tokens=5, **kw)
    p = fit.prompts[1]
    fit.prompts[1] = replace(p, context_ids=p.context_ids[: 4 * 64 + 1 - len(p.question_ids)])
    return fit, cfg


def test_keep_all_reproduces_the_full_cache(tiny_llama, rows, one_torch_thread):
    fit, cfg = _fitness(tiny_llama, rows, budget=1.0)
    f = fit.evaluate(np.zeros((2, num_params(cfg)), np.float32), [0, 1])
    np.testing.assert_allclose(f, 1.0, rtol=0, atol=_acceptance_atol(tiny_llama, fit))
    assert fit.last_details["token_match"].tolist() == [1.0, 1.0]
    assert fit.last_details["kept_fraction"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("mode,refresh", [("ragged_max", None), ("masked", None), ("ragged_max", 2)])
def test_candidates_equal_the_runtime_policy(tiny_llama, rows, mode, refresh, one_torch_thread):
    """The shared-prefill path gives exactly what the runtime NAMMPolicy gives with the same budget and schedule
    (its own prefill and end-of-prefill update; with a refresh, ``NAMMCache.reselect`` on the full cache forked
    with it, as ``SelfSpecProposer`` refreshes), also for a prompt whose last chunk is one token."""
    fit, cfg = _fitness(tiny_llama, rows, mode=mode, refresh_every=refresh, refresh_window=8)
    assert len(fit._split(1)[0]) % 64 == 1
    pop = 0.3 * np.random.default_rng(0).standard_normal((2, num_params(cfg))).astype(np.float32)
    f = fit.evaluate(pop, [0, 1])
    kept = fit.last_details["kept_fraction"]
    assert np.all(f < 1.0) and np.all(kept < 0.6)
    for k in range(2):
        ref = fit.evaluate_policy(fit.policy_for(pop[k]), [0, 1])
        assert ref["fitness"] == pytest.approx(float(f[k]), rel=0, abs=_acceptance_atol(tiny_llama, fit))
        assert ref["kept_fraction"] == pytest.approx(float(kept[k]), rel=0, abs=1e-12)   # ratios of equal counts
    assert np.array_equal(fit.evaluate(pop, [0, 1]), f)                      # deterministic, cached state unchanged
    if refresh:
        assert [j for j, _, _ in fit._prepare(0).refreshes] == [2]             # 4 tail tokens, a refresh after 2
        no_refresh, _ = _fitness(tiny_llama, rows, mode=mode)
        assert np.abs(no_refresh.evaluate(pop, [0, 1]) - f).max() > 100 * _acceptance_atol(tiny_llama, fit)  # not rounding


def test_refreshed_keep_all_reproduces_the_full_cache_and_bad_refresh_keys_are_refused(tiny_llama, rows):
    from experiments.fitness.agreement import AgreementFitnessError

    fit, cfg = _fitness(tiny_llama, rows, budget=1.0, refresh_every=1)
    np.testing.assert_allclose(fit.evaluate(np.zeros((1, num_params(cfg)), np.float32), [0, 1]), 1.0, rtol=0,
                               atol=_acceptance_atol(tiny_llama, fit))
    assert len(fit._prepare(0).refreshes) == 3
    for key, bad in (("refresh_every", 0), ("refresh_every", 2.5), ("refresh_window", 0), ("refresh_window", None)):
        with pytest.raises(AgreementFitnessError, match=key):
            _fitness(tiny_llama, rows, **{key: bad})


def test_answers_are_cached_and_bad_budgets_refused(tiny_llama, rows, tmp_path):
    from experiments.fitness.agreement import AgreementFitness, AgreementFitnessError

    path = tmp_path / "answers.json"
    fit, _ = _fitness(tiny_llama, rows, answers_path=path)
    answer = fit._answer(0)
    again, _ = _fitness(tiny_llama, rows, answers_path=path)
    assert again._answers == fit._answers and again._answer(0) == answer
    model, tok = tiny_llama
    for bad in (None, 0, 1.5, -2):
        with pytest.raises(AgreementFitnessError, match="policy_budget"):
            AgreementFitness(model, tok, rows, NAMMConfig(), None, chat=False, max_context=4096, budget=bad)


def test_acceptance_measure():
    from experiments.fitness.agreement import acceptance

    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    logits = torch.log(torch.tensor([[0.25, 0.75, 1e-30], [1.0, 1e-30, 1e-30]]))
    acc, match = acceptance(p, logits)
    # float32 logits of 0.25 / 0.75 (|log| < 1.4: rounded by < eps), a float32 softmax: p moves by < 2 eps
    assert acc == pytest.approx((0.75 + 1.0) / 2, rel=0, abs=2 * EPS32) and match == 0.5
    # a population's logits [P, m, V]: candidate by candidate the same numbers, as arrays
    pop = torch.stack([logits, logits.flip(-1), torch.zeros_like(logits)])
    accs, matches = acceptance(p, pop)
    assert accs.shape == matches.shape == (3,)
    for k in range(3):
        assert (accs[k], matches[k]) == acceptance(p, pop[k])
    empty = acceptance(p[:0], pop[:, :0])                          # no scored position: every candidate 1.0
    assert [x.tolist() for x in empty] == [[1.0] * 3] * 2 and acceptance(p[:0], logits[:0]) == (1.0, 1.0)


def test_prompt_store_gives_bit_identical_fitness_and_prefills_once(tiny_llama, rows, tmp_path, one_torch_thread):
    """``store_dir``: each prompt's shared state is written once and read back by this and any later fitness; the
    numbers equal the in-memory path's exactly (the same tensors), and a damaged file is one error with its fix."""
    from experiments.fitness.agreement import AgreementFitnessError

    cfg = _fitness(tiny_llama, rows)[1]
    pop = np.random.default_rng(3).normal(0, 0.1, (5, num_params(cfg))).astype(np.float32)
    ref = _fitness(tiny_llama, rows, pop_chunk=2)[0].evaluate(pop, [0, 1])
    store = tmp_path / "store"
    first, _ = _fitness(tiny_llama, rows, pop_chunk=2, store_dir=store, cache_prompts=False)
    assert first.prepare([0]) == 1 and first.prepare([0]) == 0          # computed once, then read back
    np.testing.assert_array_equal(first.evaluate(pop, [0, 1]), ref)
    files = sorted(store.glob("*.safetensors"))
    assert len(files) == 2 and not list(store.glob(".*tmp*"))           # one per prompt, no temporary left
    later, _ = _fitness(tiny_llama, rows, pop_chunk=2, store_dir=store)
    np.testing.assert_array_equal(later.evaluate(pop, [0, 1]), ref)
    assert later.timings["prefill"] == 0.0 and later.timings["features"] == 0.0   # nothing prefilled again
    # the runtime baselines read the stored tail and full-cache distributions
    from namm.torch.policies import build_policy

    h2o = build_policy({"name": "h2o", "budget": 0.5, "update_interval": 0, "final_update": True})
    assert later.evaluate_policy(h2o, [0, 1])["fitness"] == _fitness(tiny_llama, rows)[0].evaluate_policy(
        h2o, [0, 1])["fitness"]
    files[0].write_bytes(files[0].read_bytes()[:1000])                   # a truncated file
    with pytest.raises(AgreementFitnessError, match=r"cannot be read .*; delete .* \(it is recomputed"):
        _fitness(tiny_llama, rows, store_dir=store)[0].evaluate(pop[:1], [0, 1])
    with pytest.raises(AgreementFitnessError, match="store_dir serves no refresh"):
        _fitness(tiny_llama, rows, store_dir=store, refresh_every=2)
    with pytest.raises(AgreementFitnessError, match="needs fitness.store_dir"):
        _fitness(tiny_llama, rows)[0].prepare([0])


def test_gold_target_reads_the_reference_answer_probability(tiny_llama, rows, one_torch_thread):
    """``target=gold``: with every token kept the measure is the full model's mean probability of each reference
    token given the ones before it (teacher forcing), and ``token_match`` its argmax accuracy; a candidate is the
    same through the runtime policy as through the shared prefill."""
    fit, cfg = _fitness(tiny_llama, rows, budget=1.0, target="gold")
    model, tok = tiny_llama
    f = fit.evaluate(np.zeros((1, num_params(cfg)), np.float32), [0, 1])
    probs, matches = [], []
    for i in (0, 1):
        compressed, after = fit._split(i)
        gold = fit._gold_ids(i)
        assert tok.decode(gold).strip() == str(rows[i]["answers"][0])[: len(tok.decode(gold).strip())]
        seq = compressed + after + gold
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0].double()
        first = len(compressed) + len(after) - (1 if after else 0)   # the prefill's last logits are not scored
        pos = torch.arange(first, len(seq) - 1)
        p = torch.softmax(logits[pos], -1)
        targets = torch.tensor(seq)[pos + 1]
        probs.append(p[torch.arange(len(pos)), targets].mean().item())
        matches.append((p.argmax(-1) == targets).double().mean().item())
    np.testing.assert_allclose(f, [np.mean(probs)], rtol=0, atol=_acceptance_atol(tiny_llama, fit))
    np.testing.assert_allclose(fit.last_details["token_match"][0], np.mean(matches), rtol=0, atol=1e-12)
    small, cfg = _fitness(tiny_llama, rows, target="gold")
    pop = 0.3 * np.random.default_rng(2).standard_normal((2, num_params(cfg))).astype(np.float32)
    got = small.evaluate(pop, [0, 1])
    for k in range(2):
        assert small.evaluate_policy(small.policy_for(pop[k]), [0, 1])["fitness"] == pytest.approx(
            float(got[k]), rel=0, abs=_acceptance_atol(tiny_llama, small))
    full, _ = _fitness(tiny_llama, rows, target="full")
    assert np.abs(full.evaluate(pop, [0, 1]) - got).min() > 100 * _acceptance_atol(tiny_llama, fit)  # another target


def test_bad_targets_are_refused(tiny_llama, rows):
    from experiments.fitness.agreement import AgreementFitnessError

    with pytest.raises(AgreementFitnessError, match=r"fitness.target='reference'; use full .* or gold"):
        _fitness(tiny_llama, rows, target="reference")
    with pytest.raises(AgreementFitnessError, match="target=gold serves no refresh"):
        _fitness(tiny_llama, rows, target="gold", refresh_every=2)
    unanswered = [dict(r, answers=[]) for r in rows]
    fit, cfg = _fitness(tiny_llama, unanswered, target="gold")
    with pytest.raises(AgreementFitnessError, match="has no reference answer; use fitness.target=full"):
        fit.evaluate(np.zeros((1, num_params(cfg)), np.float32), [0])
