"""Evolve a NAMM with CMA-ES: one stage of an incremental schedule.

    python -m experiments.train_namm                        # built-in suite, stage 1 (stats fitness)
    python -m experiments.train_namm run=builtin_i2         # resumes stage 1's best ES state
    python -m experiments.train_namm run=builtin_i3         # continues with the task fitness
    python -m experiments.train_namm run=namm_i1 model=llama3_8b device=cuda   # the paper's LongBench i1
    python -m experiments.train_namm -m hydra/launcher=submitit_slurm seed=0,1,2

Writes ``<runs_root>/<run.name>/``: ``evolution/{latest,best}.npz`` (full ES state, resumable),
``evolution/norm_stats.json`` (frozen feature normalisation, inherited by later stages),
``metrics.jsonl`` (+ wandb), ``namm_policy/`` (the exported best mean) and ``train_summary.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


# The runtime schedule of fitness=agreement: no update during the prefill, one at its end.
AGREEMENT_SCHEDULE = {"update_interval": 0, "final_update": True}


def _plain(x: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def namm_config(cfg):
    from namm.config import NAMMConfig

    return NAMMConfig.from_dict(_plain(cfg.get("namm")) or {})


def evolution_config(cfg):
    from namm.evolve import EvolutionConfig

    e = dict(_plain(cfg.evolution))
    e.pop("name", None)
    return EvolutionConfig(**e)


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) item indices; held-out is empty for fraction 0 or n < 2."""
    k = int(round(n * fraction)) if n >= 2 else 0
    perm = np.random.default_rng([seed, 17]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def train(cfg) -> dict:
    """Run (or resume) the stage ``cfg.run``; returns the summary written to ``train_summary.json``."""
    import torch

    from experiments import fitness
    from experiments.lib.models import load_model_from_cfg, model_signature
    from experiments.lib.tracking import Tracker
    from experiments.tasks import load_task
    from namm.evolve import evolve, maybe_initialize_distributed, solution
    from namm.fitness import FitnessError
    from namm.scoring import num_params
    from namm.shards import atomic_write_json

    t0 = time.time()
    maybe_initialize_distributed(bool(cfg.get("distributed", False)))
    out_dir = Path(str(cfg.output_dir))
    ckpt_dir = out_dir / "evolution"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    namm_cfg = namm_config(cfg)
    es_cfg = evolution_config(cfg)
    fit_cfg = dict(_plain(cfg.fitness))
    fit_name = fit_cfg.pop("name", None)
    fitness.check_config(fit_name, fit_cfg)
    init_from = cfg.run.get("init_from")
    if init_from and not Path(str(init_from)).exists() and not (ckpt_dir / "latest.npz").exists():
        raise FitnessError(f"run.init_from={init_from} does not exist; run the previous stage first "
                           f"(python -m experiments.train_namm run=<previous stage>)")
    init_mean, init_norm = _init_policy(cfg.run.get("init_policy"), namm_cfg, init_from)
    torch.manual_seed(int(cfg.seed))
    model, tokenizer = load_model_from_cfg(cfg.model, device=str(cfg.device), cache=cfg.get("cache_dir"))
    sig = model_signature(model)
    rows = load_task(cfg.task, tokenizer, split=str(cfg.get("split", "train")), cache_dir=cfg.get("cache_dir"))
    if not rows:
        raise FitnessError(f"task {cfg.task.get('name')!r} has no prompts in split={cfg.get('split')}")
    train_idx, held_idx = split_heldout(len(rows), float(cfg.get("heldout_fraction", 0.25)), int(cfg.seed))
    norm_path = ckpt_dir / "norm_stats.json"
    inherited = Path(str(init_from)).parent / "norm_stats.json" if init_from else None
    if not norm_path.exists() and inherited is not None and inherited.exists():
        fitness.save_norm(norm_path, fitness.load_norm(inherited))  # frozen from the first stage (reference 2.4)
    if not norm_path.exists() and init_norm is not None:
        fitness.save_norm(norm_path, init_norm)                     # the exported policy's frozen normalisation
    norm = fitness.load_norm(norm_path) if norm_path.exists() else None

    train_fit, eval_fit, norm = fitness.build(fit_name, fit_cfg, cfg, model=model, tokenizer=tokenizer, rows=rows,
                                              train_idx=train_idx, held_idx=held_idx, namm_cfg=namm_cfg, norm=norm,
                                              norm_path=norm_path, out_dir=out_dir)

    if cfg.get("prepare_store"):
        return _prepare_store(train_fit, eval_fit, es_cfg, fit_name)

    logging_cfg = cfg.get("logging") or {}
    tracker = Tracker(out_dir, config=_plain(cfg), mode=str(logging_cfg.get("wandb_mode", "offline")),
                      project=str(logging_cfg.get("project", "namm-spec")), name=str(cfg.run.name),
                      metrics_file=str(logging_cfg.get("metrics_file", "metrics.jsonl")))

    logged = _logged_generations(tracker.metrics_path, str(cfg.run.name))

    def on_generation(metrics: dict, gen: int) -> None:
        if gen in logged:       # redone after a kill between its log line and its checkpoint: logged once
            return
        extra = {f"fitness/{k}_mean": float(np.mean(v)) for k, v in getattr(train_fit, "last_details", {}).items()}
        tracker.log({**metrics, **extra, "stage": str(cfg.run.name)}, step=gen)
        logged.add(gen)

    fingerprint = {"fitness": fit_name, "fitness_cfg": fit_cfg, "namm": namm_cfg.to_dict(), "model": sig,
                   "items": [f"{rows[i]['dataset']}/{rows[i]['_id']}" for i in train_idx]}
    try:
        result = evolve(train_fit, num_params(namm_cfg), es_cfg, ckpt_dir, eval_fitness=eval_fit,
                        init_from=str(init_from) if init_from else None, init_mean=init_mean,
                        fingerprint=fingerprint,
                        callback=on_generation, progress=bool(cfg.get("progress", True)))
    finally:
        tracker.close()
    best_path = ckpt_dir / "best.npz"
    solution_mean = solution(best_path) if best_path.exists() else result.mean
    export_dir = None
    if cfg.get("export", True):
        from namm.export import save_pretrained

        base = {"name": str(cfg.model.get("name")), **{k: sig[k] for k in ("num_layers", "num_kv_heads",
                                                                           "num_q_heads", "head_dim")}}
        trained_budget = fit_cfg.get("policy_budget") if fit_name in ("stats", "agreement") else None
        schedule = AGREEMENT_SCHEDULE if fit_name == "agreement" else None
        export_dir = save_pretrained(out_dir / "namm_policy", np.asarray(solution_mean, np.float32), namm_cfg,
                                     norm, base, trained_budget=trained_budget, trained_schedule=schedule)
    references = {}
    if fit_name == "stats":
        s_cfg = train_fit.cfg                       # namm.fitness.StatsFitnessConfig
        references = _heldout_references(eval_fit, s_cfg.policy_budget if s_cfg.policy_budget is not None
                                         else s_cfg.budget_target, solution_mean, cfg)
    elif fit_name == "agreement":
        references = _heldout_references(eval_fit, fit_cfg.get("policy_budget"), solution_mean, cfg, runtime=True)
    last = result.last_metrics          # the last generation's, also when a rerun had nothing left to do
    summary = {"stage": str(cfg.run.name), "fitness": fit_name, "generation": result.generation,
               "best_heldout_fitness": None if not np.isfinite(result.best_eval) else result.best_eval,
               "last_train_fitness_mean": last.get("fitness/mean"),
               "last_train_fitness_best": last.get("fitness/best"),
               "train_prompts": len(train_idx), "heldout_prompts": len(held_idx),
               "num_params": num_params(namm_cfg), "ckpt_dir": str(ckpt_dir),
               "export_dir": str(export_dir) if export_dir else None, "heldout_references": references,
               "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(out_dir / "train_summary.json", summary)
    value = summary["best_heldout_fitness"]
    if value is None:
        value = summary["last_train_fitness_mean"]
    print(f"{fit_name}_fitness_of_mean: {value} (target: > full cache's; stats: 1 - error - budget term, "
          f"task: 1.0 = full-cache parity, agreement: 1.0 = full-cache outputs reproduced)")
    return summary


def _heldout_references(eval_fit, budget, solution_mean, cfg, runtime: bool = False) -> dict:
    """The solution and the hand-designed baselines (``reference_baselines``) on the held-out prompts under the
    same fitness, each at the stage's budget: the JAX baselines in the ``stats`` simulation, the runtime's
    (``namm.torch``, the agreement schedule) under the ``agreement`` fitness."""
    names = list(_plain(cfg.get("reference_baselines")) or [])
    if eval_fit is None or not names:
        return {}
    items = np.arange(eval_fit.num_items)
    fit = float(eval_fit.evaluate(np.asarray(solution_mean, np.float32)[None], items)[0])
    details = {k: float(v[0]) for k, v in eval_fit.last_details.items()}
    out = {"namm": {"fitness": fit, **details}}
    for name in names:
        if runtime:
            from namm.torch.policies import build_policy

            policy = build_policy({"name": name, "budget": budget, **AGREEMENT_SCHEDULE})
            out[f"{name}@{budget}"] = eval_fit.evaluate_policy(policy, items)
        else:
            from namm import baselines as jbase

            out[f"{name}@{budget}"] = eval_fit.evaluate_policy(jbase.make_baseline(name, budget=budget), items, name)
    cols = [k for k in ("fitness", "error", "token_match", "kept_fraction") if k in out["namm"]]
    lines = [f"{'policy':<20} " + " ".join(f"{c:>13}" for c in cols)]
    lines += [f"{k:<20} " + " ".join(f"{v[c]:>13.4f}" for c in cols) for k, v in out.items()]
    log.info("held-out prompts, same fitness:\n%s", "\n".join(lines))
    return out


def _prepare_store(train_fit, eval_fit, es_cfg, fit_name: str) -> dict:
    """``prepare_store=true``: fill the agreement fitness' prompt store and exit, the training prompts in the
    reverse of the order the stage's first epoch visits them (so a training run started meanwhile and this
    process meet half-way), then the held-out ones."""
    from namm.evolve import Cursor, next_items
    from namm.fitness import FitnessError

    if fit_name != "agreement" or train_fit.store_dir is None:
        raise FitnessError("prepare_store=true fills the prompt store of fitness=agreement; set "
                           "fitness.store_dir (e.g. ${runs_root}/agreement_prompts)")
    batches, cursor = [], Cursor()
    while sum(map(len, batches)) < train_fit.num_items:
        items, cursor = next_items(es_cfg.seed, train_fit.num_items, es_cfg.items_per_generation, cursor)
        if cursor.epoch > 0 and cursor.pos != 0:
            break
        batches.append(list(items))
    order = [i for b in reversed(batches) for i in b]
    order += [i for i in range(train_fit.num_items) if i not in set(order)]
    out = {"train_computed": train_fit.prepare(order, "prompt store (train)"),
           "heldout_computed": eval_fit.prepare(range(eval_fit.num_items), "prompt store (held-out)")
           if eval_fit is not None else 0, "store_dir": str(train_fit.store_dir)}
    print(f"prompt_store_prepared: {out['train_computed'] + out['heldout_computed']} prompts "
          f"(target: every prompt of the stage stored)")
    return out


def _init_policy(path, namm_cfg, init_from):
    """``run.init_policy``: an exported policy (a directory or a bundled name) whose parameters are the stage's
    initial CMA-ES mean and whose feature normalisation the stage inherits -> (mean, norm), or (None, None)."""
    from namm.export import load_pretrained
    from namm.fitness import FitnessError
    from namm.pretrained import resolve

    if not path:
        return None, None
    if init_from:
        raise FitnessError("run.init_policy and run.init_from both set; a stage starts from one of them "
                           "(init_from: a previous stage's ES state, init_policy: an exported policy's parameters)")
    try:
        flat, pcfg, norm, _ = load_pretrained(resolve(str(path)))
    except FileNotFoundError as e:
        raise FitnessError(f"run.init_policy={path}: {e}") from None
    if pcfg.to_dict() | {"selection": None} != namm_cfg.to_dict() | {"selection": None}:
        diff = sorted(k for k in ("features", "scorer") if pcfg.to_dict()[k] != namm_cfg.to_dict()[k])
        raise FitnessError(f"run.init_policy={path} has another NAMM {' and '.join(diff)} configuration than this "
                           "stage; start from a policy with the same namm.features and namm.scorer, or unset "
                           "run.init_policy")
    return np.asarray(flat, np.float32), tuple(np.asarray(x, np.float32) for x in norm)


def _logged_generations(metrics_path: Path, stage: str) -> set[int]:
    """Generations of ``stage`` already in the metrics file (a resumed run does not log them twice)."""
    from experiments.lib.tracking import read_metrics

    if not Path(metrics_path).exists():
        return set()
    return {int(r["generation"]) for r in read_metrics(metrics_path)
            if r.get("stage") == stage and isinstance(r.get("generation"), int)}


def _main():
    from experiments.lib.cli import hydra_entry

    hydra_entry("train_namm", train)


if __name__ == "__main__":
    _main()
