"""The fitness of a NAMM training stage (``fitness=...``): three backends, one protocol.

- ``stats`` (``experiments.fitness.stats``): the JAX simulation over recorded KV statistics
  (``namm.fitness.StatsFitness``, the core); this package extracts the statistics and builds it.
- ``task`` (``experiments.fitness.task.TaskFitness``, PyTorch): the paper's fitness, the task score of every
  candidate through the runtime, normalised by the full cache's.
- ``agreement`` (``experiments.fitness.agreement.AgreementFitness``, PyTorch): how faithfully the compressed
  cache reproduces the full cache's answer distributions (one eviction at the end of the prefill).

The protocol is ``namm.evolve.FitnessFn``, what ``namm.evolve.evolve`` drives: ``num_items`` and
``evaluate(population [P, D], items) -> fitness [P]`` (higher is better; 1.0 ~ full-cache parity). Each backend
also has ``last_details`` (per-candidate measures of the last ``evaluate``, each ``[P]``, logged per
generation as ``fitness/<name>_mean``) and ``evaluate_policy(policy, items)`` (a hand-designed baseline under
the same measure: a ``namm.baselines`` policy in the simulation, a ``namm.torch.policies`` one in the runtime).

    train_fit, eval_fit, norm = build("agreement", fit_cfg, cfg, model=model, tokenizer=tok, rows=rows, ...)

The feature normalisation a stage runs under lives in ``<ckpt_dir>/norm_stats.json``: inherited from an earlier
stage or policy, else calibrated here on the training prompts and written there before the first candidate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from namm.evolve import FitnessFn

BACKENDS = ("stats", "task", "agreement")

# The keys each runtime backend takes (``stats`` checks its own: ``namm.fitness.StatsFitnessConfig``).
RUNTIME_FITNESS_KEYS = {"task": {"compress_question", "max_new_tokens"},
                        "agreement": {"policy_budget", "compress_question", "max_answer_tokens", "cache_prompts",
                                      "refresh_every", "refresh_window", "batched", "pop_chunk", "store_dir", "target",
                                                    "precision"}}


def check_config(fit_name, fit_cfg: dict) -> None:
    """A ``FitnessError`` unless ``fit_name`` is a backend and ``fit_cfg`` has only the keys a runtime backend
    takes."""
    from namm.fitness import FitnessError

    if fit_name not in BACKENDS:
        raise FitnessError(f"fitness={fit_name!r}; use fitness=stats, fitness=task or fitness=agreement")
    if fit_name in RUNTIME_FITNESS_KEYS:
        _check_keys(fit_name, fit_cfg, RUNTIME_FITNESS_KEYS[fit_name])


def _check_keys(fit_name: str, fit_cfg: dict, allowed: set[str]) -> None:
    from namm.fitness import FitnessError

    unknown = sorted(set(fit_cfg) - allowed)
    if unknown:
        raise FitnessError(f"fitness={fit_name} does not take {unknown}; its keys: {sorted(allowed)}")


def save_norm(path: Path, norm) -> None:
    """Write the feature normalisation ``(mean, var)`` to ``path`` (JSON, atomically)."""
    from namm.shards import atomic_write_json

    mean, var = (np.asarray(x, np.float64).tolist() for x in norm)
    atomic_write_json(path, {"mean": mean, "var": var})


def load_norm(path: Path):
    """The feature normalisation ``(mean, var)`` (float32) that ``save_norm`` wrote."""
    d = json.loads(Path(path).read_text())
    return np.asarray(d["mean"], np.float32), np.asarray(d["var"], np.float32)


def build(fit_name: str, fit_cfg: dict, cfg, *, model, tokenizer, rows, train_idx, held_idx, namm_cfg, norm,
          norm_path: Path, out_dir: Path) -> tuple[FitnessFn, FitnessFn | None, tuple]:
    """The training and held-out fitness of a stage -> ``(train_fit, eval_fit, norm)``; ``eval_fit`` is None
    without held-out prompts. ``fit_cfg`` is the ``fitness`` node without its ``name`` (checked by
    ``check_config``); ``cfg`` the stage's config (``model``, ``stats_dir``, ``extract_layers``, ``progress``, ...);
    ``train_idx`` and ``held_idx`` index ``rows``. ``norm`` is the stage's inherited normalisation or None: then
    it is calibrated on the training prompts and written to ``norm_path``, and the returned ``norm`` is that."""
    if fit_name == "stats":
        from experiments.fitness.stats import build_stats

        return build_stats(fit_cfg, cfg, model=model, tokenizer=tokenizer, rows=rows, train_idx=train_idx,
                           held_idx=held_idx, namm_cfg=namm_cfg, norm=norm, norm_path=norm_path)
    import torch

    chat, max_context = bool(cfg.model.get("chat", False)), cfg.model.get("max_context")
    if norm is None:
        from experiments.tasks import build_prompts
        from namm.torch.policy import calibrate_norm_stats

        ps = build_prompts([rows[i] for i in train_idx], tokenizer, chat, max_context)
        norm = tuple(x.numpy() for x in calibrate_norm_stats(
            model, [torch.tensor([p.ids]) for p in ps], namm_cfg, progress=bool(cfg.get("progress", True))))
        save_norm(norm_path, norm)
    if fit_name == "task":
        from experiments.fitness.task import TaskFitness as Fitness
        from experiments.fitness.task import stats_references

        common = dict(compress_question=bool(fit_cfg.get("compress_question", True)),
                      reference=stats_references(str(cfg.stats_dir), rows),
                      reference_path=out_dir / "full_cache_scores.json",
                      max_new_tokens=fit_cfg.get("max_new_tokens"))
    else:
        from experiments.fitness.agreement import AgreementFitness as Fitness

        common = dict(budget=fit_cfg.get("policy_budget"),
                      compress_question=bool(fit_cfg.get("compress_question", True)),
                      max_answer_tokens=fit_cfg.get("max_answer_tokens"),
                      cache_prompts=bool(fit_cfg.get("cache_prompts", True)),
                      refresh_every=fit_cfg.get("refresh_every"), refresh_window=fit_cfg.get("refresh_window", 16),
                      batched=fit_cfg.get("batched"), pop_chunk=fit_cfg.get("pop_chunk", 16),
                      store_dir=fit_cfg.get("store_dir"), target=fit_cfg.get("target", "full"),
                      precision=fit_cfg.get("precision", "fp32"),
                      answers_path=out_dir / "full_cache_answers.json", progress=bool(cfg.get("progress", True)))
    common.update(chat=chat, max_context=max_context)
    train_fit = Fitness(model, tokenizer, [rows[i] for i in train_idx], namm_cfg, norm, **common)
    eval_fit = Fitness(model, tokenizer, [rows[i] for i in held_idx], namm_cfg, norm,
                       **common) if len(held_idx) else None
    return train_fit, eval_fit, norm
