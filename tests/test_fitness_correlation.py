"""experiments.studies.fitness_correlation end to end on the tiny random model: a CMA-ES checkpoint, random NAMM
vectors and the baselines, each through the stats fitness and the runtime, on the same prompts."""

import json
import math
from pathlib import Path

import pytest


def _checkpoint(run_dir: Path) -> Path:
    """A CMA-ES checkpoint as experiments.train_namm writes it (tiny schedule in the fingerprint) + norm stats."""
    import jax
    import jax.numpy as jnp

    from namm.config import FeatureConfig, NAMMConfig
    from namm.evolve import Checkpoint, Cursor, EvolutionConfig, _meta, make_strategy, save_checkpoint
    from namm.scoring import num_params

    cfg = NAMMConfig(FeatureConfig(update_interval=64, chunk_size=64))
    dims = num_params(cfg)
    es_cfg = EvolutionConfig(population_size=4, sigma_init=0.3)
    es, params = make_strategy(dims, es_cfg)
    mean = 0.3 * jax.random.normal(jax.random.key(1), (dims,), jnp.float32)
    state = es.init(jax.random.key(0), mean, params)
    evo = run_dir / "evolution"
    evo.mkdir(parents=True)
    meta = _meta(dims, es_cfg, {"fitness": "stats", "namm": cfg.to_dict()})
    save_checkpoint(evo / "latest.npz", Checkpoint(state=state, key=jax.random.key(2), generation=3, stage_start=0,
                                                   cursor=Cursor(), meta=meta))
    spec = cfg.features.spec_dim
    (evo / "norm_stats.json").write_text(json.dumps({"mean": [0.0] * spec, "var": [1.0] * spec}))
    return evo


def test_end_to_end_on_tiny_random(tmp_path, capsys):
    import torch

    from experiments.studies.fitness_correlation import main

    evo = _checkpoint(tmp_path / "builtin_i1")
    out = tmp_path / "study"
    args = ["--model", "tiny_random", "--tasks", "passkey,needle_qa", "--context-length", "256", "--prompts", "2",
            "--layers", "2", "--ckpt", str(evo), "--samples", "2", "--sigmas", "0.2,0.5,1,2", "--per-sigma", "2",
            "--budgets", "0.25", "--max-new-tokens", "4", "--threads", "1", "--quiet", "--out-dir", str(out)]
    threads = torch.get_num_threads()
    try:
        main(args)                                  # python -m experiments.studies.fitness_correlation ARGS, in process
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("spearman_stats_vs_loglik: ")
    d = json.loads((out / "fitness_correlation.json").read_text())
    assert (out / "fitness_correlation.md").exists() and (out / "fitness_correlation.png").stat().st_size > 0

    ps = {p["name"]: p for p in d["policies"]}
    assert len(ps) >= 16 and len(d["prompts"]) == 2
    assert {p["family"] for p in ps.values()} >= {"namm-keepall", "namm-ckpt", "namm-random", "full", "h2o", "snapkv"}
    assert sum(p["family"] == "namm-ckpt" for p in ps.values()) == 3           # mean + 2 samples
    for p in ps.values():
        for k in ("stats_fitness", "stats_error", "stats_kept_fraction", "runtime_kept_fraction", "answer_loglik",
                  "greedy_score"):
            assert math.isfinite(p[k]), (p["name"], k, p[k])
        assert len(p["per_prompt"]) == 2
    for g in ("all", "namm", "baselines"):
        rho = d["spearman"][g]["stats_fitness"]["rho"]
        assert rho is not None and -1.0 <= rho <= 1.0
    assert d["namm_config"]["features"]["update_interval"] == 64             # taken from the checkpoint
    assert ps["h2o@0.25"]["runtime_kept_fraction"] < 0.35 < ps["full"]["runtime_kept_fraction"]

    # the keep-all NAMM is the full cache: same log-lik on every prompt, same stats fitness
    keep, full = ps["namm:keep-all"], ps["full"]
    assert [x["answer_loglik"] for x in keep["per_prompt"]] == [x["answer_loglik"] for x in full["per_prompt"]]
    assert keep["runtime_kept_fraction"] == 1.0 and keep["stats_error"] == pytest.approx(0.0, abs=1e-6)
    assert keep["stats_fitness"] == pytest.approx(full["stats_fitness"], abs=1e-6)

    # the greedy answer recorded by the study is greedy_generate's (from a copy of the prefilled cache)
    from experiments.studies.fitness_correlation import _interleave
    from experiments.lib.models import tiny_random
    from experiments.tasks import build_prompts, load_task
    from namm.torch.generate import greedy_generate
    from namm.torch.policies import build_policy

    model, tok = tiny_random("llama", seed=0)
    rows = _interleave(load_task({"name": "builtin", "tasks": ["passkey", "needle_qa"], "n": 1,
                                  "context_lengths": [256], "seed": 0}, tok, split="train"), 2)
    prompt = build_prompts(rows, tok, False, 8192)[0]
    h2o = ps["h2o@0.25"]
    g = greedy_generate(model, torch.tensor([prompt.context_ids]), torch.tensor([prompt.question_ids]), 4,
                        policy=build_policy(h2o["runtime_config"]))
    assert h2o["per_prompt"][0]["greedy_tokens"] == g.token_ids
    assert h2o["per_prompt"][0]["kept_fraction"] == pytest.approx(g.kv_fraction_prefill)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,nope"], "unknown task 'nope'"),
    (["--ckpt", "/no/such/dir"], "--ckpt /no/such/dir: no such directory"),
    (["--budgets", "1.5"], "--budgets 1.5"),
])
def test_bad_input_is_one_line_error(args, message, capsys):
    from experiments.studies.fitness_correlation import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny_random", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_empty_checkpoint_dir_is_refused(tmp_path, capsys):
    from experiments.studies.fitness_correlation import main

    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path)])
    assert "no CMA-ES checkpoints" in capsys.readouterr().err


def test_baselines_as_one_population_match_evaluate_policy():
    """The lax.switch population of baselines gives StatsFitness.evaluate_policy's numbers, baseline by baseline."""
    import numpy as np

    from experiments.studies.fitness_correlation import evaluate_baselines, jax_baseline
    from namm import stats as kvstats
    from namm.config import FeatureConfig, NAMMConfig
    from namm.features import NormParams
    from namm.fitness import StatsFitness, StatsFitnessConfig, load_stats_data

    rng = np.random.default_rng(0)
    t, ctx, q = 200, 170, 20
    p = kvstats.PromptStats(q=rng.standard_normal((1, 4, t, 16)).astype(np.float16),
                            k=rng.standard_normal((1, 2, t, 16)).astype(np.float16),
                            v=rng.standard_normal((1, 2, t, 16)).astype(np.float16), layers=np.array([0]),
                            task="passkey", id="0", context_len=ctx, question_len=q, answer_len=t - ctx - q, score=1.0)
    cfg = NAMMConfig(FeatureConfig(update_interval=64, chunk_size=64))
    s_cfg = StatsFitnessConfig(context_queries=8, max_qa_queries=16, pop_chunk=None)
    fit = StatsFitness(load_stats_data([p], cfg, s_cfg), cfg, s_cfg, norm=NormParams.identity(cfg.features.spec_dim))
    names = [("full", None), ("h2o", 0.25), ("l2", 0.5), ("random", 0.25)]
    pols = [jax_baseline(n, b, 0) for n, b in names]
    got = evaluate_baselines(fit, pols, np.array([0]), [f"{n}{b}" for n, b in names])
    for (n, b), pol, row in zip(names, pols, got):
        ref = fit.evaluate_policy(pol, np.array([0]), name=f"{n}{b}")
        assert row == pytest.approx([ref["fitness"], ref["error"], ref["kept_fraction"]], abs=1e-6), n
    assert got[0][1] == pytest.approx(0.0, abs=1e-6) and got[1][2] < 0.6     # full: no error; h2o compresses
