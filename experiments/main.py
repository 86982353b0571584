"""The main job (``make run``): the whole NAMM pipeline on SmolLM2 and the built-in suite.

    python -m experiments.main [model=smollm2] [stages.0.evolution.generations=20] ...

1. prepare   the model (converted once) and the task suite
2. extract   KV statistics of the training prompts (skipped when the shards exist)
3. evolve    stage by stage (``stages``: stats, then task), each resuming the previous best ES state
4. export    the best mean of the last stage as a policy directory
5. evaluate  full cache vs NAMM vs H2O / L2 given NAMM's own mean kept cache, on held-out prompts
6. report    results table (printed, ``results.md``), ``score_vs_kv.png``, ``main_summary.json``

Every step resumes: checkpoints, shards and predictions already written are reused.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage_config(cfg: DictConfig, stage: DictConfig, init_from: str | None) -> DictConfig:
    """The ``train_namm`` config of one stage: the main config with the stage's fitness/evolution."""
    name = str(stage.name)
    fit = OmegaConf.load(CONFIGS / "fitness" / f"{stage.fitness.name}.yaml")
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("stages", None)
    base.pop("hydra", None)
    out = OmegaConf.create(base)
    OmegaConf.set_struct(out, False)
    out.fitness = OmegaConf.merge(fit, stage.get("fitness") or {})
    out.evolution = OmegaConf.merge(cfg.evolution, stage.get("evolution") or {})
    out.run = {"name": name, "init_from": init_from}
    out.output_dir = f"{cfg.runs_root}/{name}"
    return out


def run(cfg: DictConfig) -> dict:
    from experiments.lib import reporting
    from experiments.evaluate import evaluate, load_policy_cfg
    from experiments.lib.models import load_model_from_cfg
    from experiments.tasks import load_task
    from experiments.train_namm import train
    from namm.shards import atomic_write_json

    t0 = time.time()
    root = Path(str(cfg.runs_root))
    root.mkdir(parents=True, exist_ok=True)
    timings, stages = {}, []
    init_from = None
    for stage in cfg.stages:
        t = time.time()
        s = train(stage_config(cfg, stage, init_from))
        stages.append(s)
        timings[f"stage_{stage.name}_s"] = round(time.time() - t, 1)
        best = Path(s["ckpt_dir"]) / "best.npz"
        init_from = str(best if best.exists() else Path(s["ckpt_dir"]) / "latest.npz")
    policy_dir = stages[-1]["export_dir"]

    t = time.time()
    model, tok = load_model_from_cfg(cfg.model, device=str(cfg.device), cache=cfg.get("cache_dir"))
    ev = cfg.evaluation
    test_task = OmegaConf.merge(cfg.task, {"n": int(ev.n)})
    rows = load_task(test_task, tok, split="test", cache_dir=cfg.get("cache_dir"))
    if ev.get("max_prompts"):
        rows = rows[: int(ev.max_prompts)]
    eval_dir = root / "evaluation"
    common = dict(chat=bool(cfg.model.get("chat", False)), max_context=cfg.model.get("max_context"),
                  question_in_compression=bool(cfg.get("question_in_compression", True)),
                  progress=bool(cfg.get("progress", True)))
    namm_run = {**load_policy_cfg("namm"), "path": policy_dir,
                "chunk_size": int(cfg.namm.features.chunk_size),
                "update_interval": int(cfg.namm.features.update_interval)}
    preds = evaluate(model, tok, rows, [{"name": "full", "budget": None}, namm_run], eval_dir, **common)
    namm_kv = [p["kv_fraction_prefill"] for p in preds if p["policy"] == "namm"]
    budget = round(float(sum(namm_kv) / len(namm_kv)), 3)
    budget = min(1.0, max(budget, 0.01))
    runs = [{"name": "full", "budget": None}, namm_run] + [
        {**load_policy_cfg(str(b)), "budget": budget} for b in ev.baselines]
    preds = evaluate(model, tok, rows, runs, eval_dir, **common)
    timings["evaluation_s"] = round(time.time() - t, 1)
    results = reporting.aggregate(preds)
    intervals = reporting.bootstrap_normalised(preds, seed=int(cfg.seed))
    paths = reporting.write_results(results, eval_dir, intervals)
    norm = reporting.normalised_scores(results)
    means = reporting.column_means(results)
    kv = reporting.column_means(results, "kv_fraction")
    namm_label = reporting.policy_label("namm", None)
    summary = {"stages": stages, "policy_dir": policy_dir, "baseline_budget": budget,
               "normalised_score": norm, "normalised_score_95ci": intervals, "mean_score": means, "kv_fraction": kv,
               "heldout_prompts": len(rows), "timings": timings, "wall_s": round(time.time() - t0, 1),
               "files": {k: str(v) for k, v in paths.items()}}
    atomic_write_json(root / "main_summary.json", summary)
    if cfg.get("progress", True):
        reporting.print_table(results)
    for label, v in norm.items():
        print(f"{label}: normalised {v:.3f}, kept {kv.get(label, float('nan')):.3f}")
    print(f"total wall time: {summary['wall_s']:.0f} s")
    headline = norm.get(namm_label, float("nan"))  # nan when the full cache scores 0 everywhere
    print(f"namm_normalised_score: {headline:.3f} "
          f"(target: >= 0.97 of full cache at <= 0.5 kept, and above h2o/l2 at the same budget)")
    return summary


def _main():
    from experiments.lib.cli import hydra_entry

    hydra_entry("main", run)


if __name__ == "__main__":
    _main()
