"""experiments.train_namm end to end on the tiny random model: stats stage -> export -> resume ->
task stage resuming the stats stage's ES state."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from experiments.train_namm import split_heldout, train
from namm.fitness import FitnessError

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
TINY = ["model=tiny_random", "task.tasks=[passkey]", "task.context_lengths=[256]", "task.n=4",
        "namm.features.update_interval=64", "namm.features.chunk_size=64", "evolution.population_size=4",
        "evolution.items_per_generation=2", "evolution.eval_every=1", "extract_layers=null",
        "logging.wandb_mode=disabled", "progress=false", "reference_baselines=[h2o]"]
STATS = ["fitness.context_queries=8", "fitness.max_qa_queries=16"]


def _cfg(tmp_path: Path, run: str, *extra: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("train_namm", overrides=[f"run={run}", *TINY, f"runs_root={tmp_path}",
                                                f"output_dir={tmp_path}/{run}", *extra])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    return tmp_path, train(_cfg(tmp_path, "builtin_i1", "evolution.generations=2", *STATS))


def test_stats_stage_exports_and_resumes(stage1):
    from namm.torch.policy import NAMMPolicy

    tmp_path, s1 = stage1

    stage = tmp_path / "builtin_i1"
    assert s1["generation"] == 2 and s1["fitness"] == "stats" and s1["heldout_prompts"] == 1
    assert (stage / "evolution" / "best.npz").exists() and (stage / "evolution" / "norm_stats.json").exists()
    rows = [json.loads(l) for l in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [1, 2] and "fitness/kept_fraction_mean" in rows[0]
    refs = s1["heldout_references"]                     # the mean and H2O on the held-out prompt, same simulation
    assert set(refs) == {"namm", "h2o@0.5"} and refs["namm"]["fitness"] == pytest.approx(s1["best_heldout_fitness"])
    assert refs["h2o@0.5"]["kept_fraction"] < 1.0 and 0.0 <= refs["h2o@0.5"]["error"] <= 1.0
    policy = NAMMPolicy.from_pretrained(stage / "namm_policy")          # the exported best mean loads
    assert policy.cfg.features.update_interval == 64
    # the same command again: nothing left to do, same result
    again = train(_cfg(tmp_path, "builtin_i1", "evolution.generations=2", *STATS))
    assert again["generation"] == 2 and len((stage / "metrics.jsonl").read_text().splitlines()) == 2


def test_capped_stage_exports_its_budget(stage1):
    """``run=builtin_cap50``: stage 1's ES state evolved under the runtime cap; the export carries it."""
    from namm.torch.policy import NAMMPolicy

    tmp_path, _ = stage1
    cap = train(_cfg(tmp_path, "builtin_cap50", "evolution.generations=1", "evolution.eval_every=0",
                     "reference_baselines=[]", *STATS))
    best1 = json.loads(str(np.load(tmp_path / "builtin_i1" / "evolution" / "best.npz")["info_json"]))["generation"]
    assert cap["generation"] == best1 + 1
    rows = [json.loads(l) for l in (tmp_path / "builtin_cap50" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fitness/kept_fraction_mean"] < 0.9       # the cap evicts although the threshold is off
    assert cap["heldout_references"] == {}
    policy = NAMMPolicy.from_pretrained(tmp_path / "builtin_cap50" / "namm_policy")
    assert policy.budget == 0.5 and policy.cfg.selection.threshold == -1e30


def test_agreement_stage_exports_its_budget_and_schedule(stage1):
    """``run=builtin_agree50``: stage 1's ES state under the agreement fitness; the export carries the cap and the
    one-eviction schedule, and the held-out references run the runtime baselines under the same fitness."""
    from namm.torch.policy import NAMMPolicy

    tmp_path, _ = stage1
    s = train(_cfg(tmp_path, "builtin_agree50", "evolution.generations=1", "fitness.max_answer_tokens=3"))
    best1 = json.loads(str(np.load(tmp_path / "builtin_i1" / "evolution" / "best.npz")["info_json"]))["generation"]
    assert s["fitness"] == "agreement" and s["generation"] == best1 + 1
    refs = s["heldout_references"]
    assert refs["namm"]["fitness"] == pytest.approx(s["best_heldout_fitness"], abs=1e-6)
    assert 0.0 < refs["h2o@0.5"]["fitness"] <= 1.0 and refs["h2o@0.5"]["kept_fraction"] <= 0.51
    assert (tmp_path / "builtin_agree50" / "full_cache_answers.json").exists()
    policy = NAMMPolicy.from_pretrained(tmp_path / "builtin_agree50" / "namm_policy")
    assert (policy.budget, policy.update_interval, policy.final_update) == (0.5, 0, True)
    with pytest.raises(FitnessError, match=r"does not take \['max_new_tokens'\]"):   # a key of another fitness
        train(_cfg(tmp_path, "builtin_agree50", "+fitness.max_new_tokens=3"))


@pytest.mark.slow  # the task fitness generates with the runtime for every candidate (minutes on 2 cores)
def test_task_stage_continues_the_stats_stage(stage1):
    """Stage 3 (task fitness) starts from stage 1's best ES state and inherits the frozen norm stats."""
    tmp_path, _ = stage1
    stage = tmp_path / "builtin_i1"
    s3 = train(_cfg(tmp_path, "builtin_i3", "evolution.generations=1", "evolution.population_size=2",
                    "evolution.eval_every=0", f"run.init_from={stage}/evolution/best.npz", "fitness.max_new_tokens=2"))
    best1 = json.loads(str(np.load(stage / "evolution" / "best.npz")["info_json"]))["generation"]
    assert s3["fitness"] == "task" and s3["generation"] == best1 + 1
    assert (json.loads((tmp_path / "builtin_i3" / "evolution" / "norm_stats.json").read_text())
            == json.loads((stage / "evolution" / "norm_stats.json").read_text()))


def test_heldout_split_is_deterministic_and_disjoint():
    a, b = split_heldout(12, 0.25, 0)
    assert len(b) == 3 and not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(12))
    assert np.array_equal(split_heldout(12, 0.25, 0)[1], b)
    assert len(split_heldout(1, 0.5, 0)[1]) == 0


def test_task_fitness_normalisation_and_keep_all_parity():
    """Per task: sum of scores / sum of full-cache scores, mean over tasks; the zero (keep-all) NAMM
    reproduces the full cache, so its fitness is exactly 1.0."""
    from experiments.lib.models import tiny_random
    from experiments.fitness.task import TaskFitness
    from experiments.tasks import load_task
    from namm.config import FeatureConfig, NAMMConfig
    from namm.scoring import num_params

    model, tok = tiny_random("llama", seed=0)
    rows = load_task({"name": "passkey", "n": 1, "context_lengths": [256], "seed": 0}, tok, split="train")
    cfg = NAMMConfig(features=FeatureConfig(update_interval=64, chunk_size=64))
    fit = TaskFitness(model, tok, rows, cfg, None, chat=False, max_context=4096, max_new_tokens=3)
    fit.reference = {f"{rows[0]['dataset']}/{rows[0]['_id']}": 0.5}
    assert fit.normalised(np.array([0.25]), [0]) == 0.5
    fit.reference = {}                                   # computed with the full cache on first use
    f = fit.evaluate(np.zeros((1, num_params(cfg)), np.float32), np.array([0]))
    assert f.tolist() == [1.0] and fit.last_details["kept_fraction"][0] == 1.0
    fit.reference = {f"{rows[0]['dataset']}/{rows[0]['_id']}": 0.0}
    assert fit.normalised(np.array([1.0]), [0]) == 2.0     # full cache failed: 1 + successes


@pytest.mark.slow  # the whole pipeline (extract, two stages, four evaluated policies): minutes on 2 cores
def test_main_job_end_to_end_on_the_tiny_model(tmp_path):
    from experiments.main import run

    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose("main", overrides=[
            "model=tiny_random", f"runs_root={tmp_path}", "task.tasks=[passkey,kv_retrieval]",
            "task.context_lengths=[256]", "task.n=3", "namm.features.update_interval=64",
            "namm.features.chunk_size=64", "evolution.population_size=4",
            "stages.0.evolution={generations: 2, items_per_generation: 2, eval_every: 1}",
            "stages.1.evolution={population_size: 2, generations: 1, items_per_generation: 2, eval_every: 0}",
            "stages.1.fitness.max_new_tokens=4", "evaluation.n=1", "extract_layers=null",
            "logging.wandb_mode=disabled", "progress=false"])
    s = run(cfg)
    assert [st["fitness"] for st in s["stages"]] == ["stats", "task"]
    best = json.loads(str(np.load(tmp_path / "stats" / "evolution" / "best.npz")["info_json"]))["generation"]
    assert s["stages"][1]["generation"] == best + 1                 # the task stage continues the stats stage
    assert set(s["kv_fraction"]) == {"full", "namm", f"h2o@{s['baseline_budget']}", f"l2@{s['baseline_budget']}"}
    assert (tmp_path / "evaluation" / "results.md").exists() and (tmp_path / "evaluation" / "score_vs_kv.png").exists()
    again = run(cfg)                                                 # every step resumes: nothing is redone
    assert again["stages"][1]["generation"] == best + 1 and again["kv_fraction"] == s["kv_fraction"]


def test_long_agreement_stage_starts_from_a_policy_and_fills_its_prompt_store(stage1):
    """``run=builtin_agree_long``: the CMA-ES mean starts at an exported policy's parameters and the stage inherits
    its normalisation; ``prepare_store=true`` fills the prompt store (train, then held-out) that training reads."""
    from namm.export import load_pretrained

    tmp_path, _ = stage1
    policy = tmp_path / "builtin_i1" / "namm_policy"
    common = ["evolution.generations=1", "fitness.max_answer_tokens=3", f"run.init_policy={policy}",
              "heldout_fraction=0.25", "reference_baselines=[]"]
    prep = train(_cfg(tmp_path, "builtin_agree_long", "prepare_store=true", *common))
    assert (prep["train_computed"], prep["heldout_computed"]) == (3, 1)
    assert train(_cfg(tmp_path, "builtin_agree_long", "prepare_store=true", *common))["train_computed"] == 0
    s = train(_cfg(tmp_path, "builtin_agree_long", *common))
    assert s["fitness"] == "agreement" and s["generation"] == 1 and s["train_prompts"] == 3
    assert len(list((tmp_path / "agreement_prompts").glob("*.safetensors"))) == 4   # nothing stored twice
    gold = train(_cfg(tmp_path, "builtin_gold_long", *common))    # the reference-answer target, the same store
    assert gold["generation"] == 1 and gold["train_prompts"] == 3 and gold["last_train_fitness_mean"] != s["last_train_fitness_mean"]
    assert len(list((tmp_path / "agreement_prompts").glob("*.safetensors"))) == 4
    _, _, (mean, var), _ = load_pretrained(policy)
    norm = json.loads((tmp_path / "builtin_agree_long" / "evolution" / "norm_stats.json").read_text())
    np.testing.assert_array_equal(np.asarray(norm["mean"], np.float32), mean)
    with pytest.raises(FitnessError, match="has another NAMM scorer configuration"):
        train(_cfg(tmp_path, "builtin_agree_long", *common, "namm.scorer.kind=mlp", "output_dir=" + str(tmp_path / "x")))
    with pytest.raises(FitnessError, match="init_policy and run.init_from both set"):
        train(_cfg(tmp_path, "builtin_agree_long", *common, "run.init_from=" + str(policy), "output_dir=" + str(tmp_path / "y")))
    with pytest.raises(FitnessError, match="prepare_store=true fills the prompt store"):
        train(_cfg(tmp_path, "builtin_agree_long", "prepare_store=true", "fitness.store_dir=null", *common))


def test_bf16_fitness_trains_end_to_end(stage1, tmp_path):
    """``fitness.precision=bf16`` through the stage config: the batched scorer and answer forward in bfloat16
    train, export and resume like fp32; a typo in the precision is one early error."""
    policy = stage1[0] / "builtin_i1" / "namm_policy"
    common = ["fitness.max_answer_tokens=3", f"run.init_policy={policy}", "heldout_fraction=0.25",
              "reference_baselines=[]"]
    s = train(_cfg(tmp_path, "builtin_gold_long", "evolution.generations=1", "fitness.precision=bf16", *common))
    assert s["generation"] == 1 and np.isfinite(s["last_train_fitness_mean"])
    assert (tmp_path / "builtin_gold_long" / "namm_policy").exists()
    again = train(_cfg(tmp_path, "builtin_gold_long", "evolution.generations=2", "fitness.precision=bf16", *common))
    assert again["generation"] == 2
    with pytest.raises(ValueError, match="precision='fp16'; use fp32 or bf16"):
        train(_cfg(tmp_path / "typo", "builtin_gold_long", "evolution.generations=1", "fitness.precision=fp16",
                   *common))
